"""Pre-quantized expert weights on disk: a folder of safetensors files, one per MoE layer, plus a manifest.

Layout (see docs/weight_format.md for the full description)::

    OUT_DIR/
      ktmoe_weights.json          manifest: layout version, format name + version, group size, E/H/I,
                                  source, and per layer: file name, size, sha256, every tensor's dtype/shape
      layer_000.safetensors       tensors gate.data, gate.scale[, gate.zero], up.*, down.* of that layer,
      layer_001.safetensors       exactly the `Packed` fields of the layer's weight format
      ...

`write_layer()` adds one layer (file first, written to a temporary name and renamed, then the manifest,
also replaced atomically). `read_layer()` opens one file with `safetensors.safe_open` and reads it tensor
by tensor (with an expert order: expert by expert, straight into the destination), checks everything
against the manifest, the file's own metadata and what the wrapper's format expects, and returns the three
`Packed` objects only once all of them are complete: an error leaves the caller's weights untouched.

Every problem raises `FileNotFoundError` (missing folder, manifest or layer file) or `WeightFileError`
(a `ValueError`) whose message names the file and, where one is at fault, the tensor key."""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._version import __version__
from .formats import FORMATS, Packed, WeightFormat, expert_shapes

MANIFEST_NAME = "ktmoe_weights.json"
LAYOUT_VERSION = 1          # version of the folder layout / manifest schema (this module)
DEFAULT_FORMAT_VERSION = 1  # a WeightFormat may set `version` when its on-disk encoding changes
PROJECTIONS = ("gate", "up", "down")
PARTS = ("data", "scale", "zero")
CHECKSUM_ENV = "KTMOE_WEIGHTS_CHECKSUM"  # "1": read_layer() also checks each file's sha256 (reads it twice)

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32",
                torch.int8: "int8", torch.uint8: "uint8"}
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
              "U8": torch.uint8}


class WeightFileError(ValueError):
    """A weight folder or file that does not match what the reader expects (names the file and key)."""


# ------------------------------------------------------------------------------------------------ helpers
def layer_filename(layer_idx: int) -> str:
    return f"layer_{int(layer_idx):03d}.safetensors"


def layer_path(folder: str, layer_idx: int) -> str:
    """Where layer `layer_idx`'s file of a weight folder is (as read_layer reads it)."""
    folder = os.fspath(folder)
    try:
        entry = read_manifest(folder)["layers"].get(str(int(layer_idx)))
    except (OSError, ValueError):
        entry = None
    name = entry["file"] if isinstance(entry, dict) and isinstance(entry.get("file"), str) else \
        layer_filename(layer_idx)
    return os.path.join(folder, name)


def stat_key(path: str) -> Tuple[int, int, int, int]:
    """(size, mtime_ns, inode, device) of a file: what changes when it is rewritten, replaced or truncated."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def format_version(weight_format: WeightFormat) -> int:
    return int(getattr(weight_format, "version", DEFAULT_FORMAT_VERSION))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def expected_group_size(weight_format: WeightFormat, group_size: int) -> Optional[int]:
    """What the manifest records as group_size: the K-group size for per-group formats, None otherwise."""
    return int(group_size) if weight_format.per_group else None


def expected_tensors(weight_format: WeightFormat, E: int, H: int, I: int, group_size: int,
                     block_size: Optional[Sequence[int]] = None) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    """{key: (dtype, shape)} of the tensors a layer file holds for this format and these sizes.

    From the format's tensor_spec (for row-by-row formats: packing one zero row per projection, so a new
    format needs nothing here). block_size: (rows, cols) per scale of the 2-D block formats (fp8; default
    the format's own)."""
    out: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
    for which, (_, R, C) in zip(PROJECTIONS, expert_shapes(E, H, I)):
        group, block_rows = _blocks_of(weight_format, C, group_size, block_size)
        for part, spec in weight_format.tensor_spec(E, R, C, group, block_rows).items():
            out[f"{which}.{part}"] = spec
    return out


def _blocks_of(weight_format: WeightFormat, C: int, group_size: int,
               block_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """(group, block_rows) of a projection with C input columns."""
    if weight_format.blocks_2d:
        br, bc = weight_format.block_size if block_size is None else block_size
        return int(bc), int(br)
    return weight_format.group_for(C, group_size), 1


def _manifest_block_size(path: str, m: Dict[str, Any], weight_format: WeightFormat) -> Optional[List[int]]:
    """The manifest's block_size ([rows, cols] per scale) of a 2-D block format; None for the others."""
    if not weight_format.blocks_2d:
        return None
    b = m.get("block_size")
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                         for v in b)):
        raise WeightFileError(f"{path}: manifest key 'block_size' must be [rows, cols] of positive ints for "
                              f"format {weight_format.name!r}, got {b!r}")
    return b


def _atomic_write_json(path: str, obj: Any) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".ktmoe_manifest.", suffix=".tmp", dir=folder)
    try:
        text = json.dumps(obj, indent=1, sort_keys=True)
        text = re.sub(r"\[\s*([0-9][0-9,\s]*?)\s*\]", lambda mo: "[" + re.sub(r"\s+", " ", mo.group(1)) + "]",
                      text)  # shapes on one line
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------------------------------ manifest
def read_manifest(folder: str) -> Dict[str, Any]:
    """The folder's manifest, with its schema checked (not the files)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"weight folder {folder!r} does not exist (write it with python -m ktmoe.convert)")
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {MANIFEST_NAME} manifest; is {folder!r} a folder written by "
                                "python -m ktmoe.convert?")
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightFileError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(m, dict):
        raise WeightFileError(f"{path}: the manifest is not a JSON object")
    need = {"layout_version": int, "format": str, "format_version": int, "num_experts": int, "hidden_size": int,
            "moe_intermediate_size": int, "layers": dict}
    for key, typ in need.items():
        if not isinstance(m.get(key), typ) or isinstance(m.get(key), bool):
            raise WeightFileError(f"{path}: manifest key {key!r} missing or not a {typ.__name__} "
                                  f"(got {m.get(key)!r})")
    if m["layout_version"] != LAYOUT_VERSION:
        raise WeightFileError(f"{path}: manifest key 'layout_version' is {m['layout_version']}, this ktmoe reads "
                              f"version {LAYOUT_VERSION}; convert the checkpoint again with this ktmoe")
    gs = m.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool)):
        raise WeightFileError(f"{path}: manifest key 'group_size' must be an int or null, got {gs!r}")
    return m


def _check_manifest_matches(path: str, m: Dict[str, Any], weight_format: WeightFormat, E: int, H: int, I: int,
                            group_size: int) -> None:
    if m["format"] != weight_format.name:
        raise WeightFileError(f"{path}: manifest key 'format' is {m['format']!r} (written for method "
                              f"{m.get('method', '?')}) but this wrapper's method uses format "
                              f"{weight_format.name!r}; convert again with the wrapper's method or pick a method "
                              f"of format {m['format']!r}")
    if m["format_version"] != format_version(weight_format):
        raise WeightFileError(f"{path}: manifest key 'format_version' is {m['format_version']} but this ktmoe "
                              f"reads format {weight_format.name!r} version {format_version(weight_format)}; "
                              "convert the checkpoint again with this ktmoe")
    want = expected_group_size(weight_format, group_size)
    if m.get("group_size") != want:
        raise WeightFileError(f"{path}: manifest key 'group_size' is {m.get('group_size')!r} but the wrapper "
                              f"expects {want!r} (group_size={group_size}); pass group_size={m.get('group_size')} "
                              "to the wrapper or convert again")
    for key, v in (("num_experts", E), ("hidden_size", H), ("moe_intermediate_size", I)):
        if m[key] != v:
            raise WeightFileError(f"{path}: manifest key {key!r} is {m[key]} but the wrapper has {key}={v}")


def _layer_entry(path: str, m: Dict[str, Any], layer_idx: int) -> Dict[str, Any]:
    entry = m["layers"].get(str(int(layer_idx)))
    if entry is None:
        have = sorted(int(k) for k in m["layers"] if k.isdigit())
        raise FileNotFoundError(f"{path}: layer {layer_idx} is not in this weight folder (layers present: "
                                f"{have}); convert it with --layers")
    if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
            or not isinstance(entry.get("tensors"), dict):
        raise WeightFileError(f"{path}: manifest entry of layer {layer_idx} is malformed (needs 'file' and "
                              "'tensors')")
    if os.path.basename(entry["file"]) != entry["file"]:
        raise WeightFileError(f"{path}: manifest entry of layer {layer_idx} names file {entry['file']!r} "
                              "outside the folder")
    return entry


# ------------------------------------------------------------------------------------------------ writing
def write_layer(folder: str, layer_idx: int, weight_format: WeightFormat, packed: Sequence[Packed], *,
                source: Any = None, method: Optional[str] = None, group_size: Optional[int] = None) -> str:
    """Writes one layer's (gate, up, down) `Packed` triplet to FOLDER/layer_XXX.safetensors and records it
    in the manifest (created on the first layer; later layers must agree on format, group size and E/H/I).
    `source` (any JSON value, e.g. the checkpoint folder) and `method` are recorded for information.
    group_size: the K-group size for per-group formats (default: the packed weights' group). Returns the
    file's path."""
    folder = os.fspath(folder)
    if len(packed) != 3 or not all(isinstance(p, Packed) for p in packed):
        raise TypeError("packed must be a (gate, up, down) triplet of ktmoe.formats.Packed")
    gate, up, down = packed
    E, I, H = gate.shape
    want_shapes = expert_shapes(E, H, I)
    for which, p, shape in zip(PROJECTIONS, packed, want_shapes):
        if tuple(p.shape) != shape:
            raise ValueError(f"{which}: packed shape {tuple(p.shape)}, expected {shape} (gate, up [E, I, H]; "
                             "down [E, H, I])")
    if weight_format.per_group:
        gs = gate.group if group_size is None else int(group_size)
    else:
        gs = 128 if group_size is None else int(group_size)  # unused by per-row formats
    block = [gate.block_rows, gate.group] if weight_format.blocks_2d else None  # recorded in the manifest
    spec = expected_tensors(weight_format, E, H, I, gs, block)
    tensors: Dict[str, torch.Tensor] = {}
    for which, p, (_, _, C) in zip(PROJECTIONS, packed, want_shapes):
        want_blocks = _blocks_of(weight_format, C, gs, block)
        if (p.group, p.block_rows) != want_blocks:
            raise ValueError(f"{which}: packed scale blocks of {p.block_rows} x {p.group} differ from "
                             f"{weight_format.name}'s {want_blocks[1]} x {want_blocks[0]} (group_size={gs}"
                             f"{'' if block is None else ', the block of gate'})")
        for part in PARTS:
            t = getattr(p, part)
            key = f"{which}.{part}"
            if (t is None) != (key not in spec):
                raise ValueError(f"{key}: {'missing' if t is None else 'unexpected'} for format "
                                 f"{weight_format.name!r}")
            if t is None:
                continue
            dt, shape = spec[key]
            if t.dtype != dt or tuple(t.shape) != shape:
                raise ValueError(f"{key}: got {t.dtype} {tuple(t.shape)}, format {weight_format.name!r} "
                                 f"stores {dt} {shape}")
            tensors[key] = t.detach().to("cpu").contiguous()

    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    header = dict(layout_version=LAYOUT_VERSION, format=weight_format.name,
                  format_version=format_version(weight_format),
                  group_size=expected_group_size(weight_format, gs), num_experts=E, hidden_size=H,
                  moe_intermediate_size=I)
    if block is not None:
        header["block_size"] = block
    if os.path.exists(manifest_path):
        m = read_manifest(folder)
        for key, v in header.items():
            if m.get(key) != v:
                raise WeightFileError(f"{manifest_path}: the folder holds {key}={m.get(key)!r}, this layer has "
                                      f"{v!r}; write to a new folder")
    else:
        m = dict(header, layers={}, created_by=f"ktmoe {__version__}")
    if method is not None:
        m["method"] = method
    if source is not None:
        m["source"] = source

    name = layer_filename(layer_idx)
    path = os.path.join(folder, name)
    meta = {k: ("" if v is None else str(v)) for k, v in header.items()}
    meta["layer"] = str(int(layer_idx))
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        size = os.path.getsize(tmp)
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    m["layers"][str(int(layer_idx))] = dict(
        file=name, size=size, sha256=digest,
        tensors={k: dict(dtype=dtype_name(t.dtype), shape=list(t.shape)) for k, t in sorted(tensors.items())})
    m["layers"] = {k: m["layers"][k] for k in sorted(m["layers"], key=int)}
    _atomic_write_json(manifest_path, m)
    return path


# ------------------------------------------------------------------------------------------------ reading
def _open(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a bad header, OSError, ...
        raise WeightFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _check_file(path: str, f, entry: Dict[str, Any], spec: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                header: Dict[str, Any], layer_idx: int) -> None:
    """Checks the open file's metadata and every tensor's dtype/shape (header only, no data read)."""
    meta = f.metadata() or {}
    want_meta = {k: ("" if v is None else str(v)) for k, v in header.items()}
    want_meta["layer"] = str(int(layer_idx))
    for key, v in want_meta.items():
        if meta.get(key) != v:
            raise WeightFileError(f"{path}: file metadata {key!r} is {meta.get(key)!r}, expected {v!r} "
                                  "(the file does not belong to this layer / folder)")
    keys = set(f.keys())
    for key, (dt, shape) in spec.items():
        if key not in keys:
            raise WeightFileError(f"{path}: tensor key {key!r} is missing (keys present: {sorted(keys)})")
        sl = f.get_slice(key)
        got_dt = _ST_DTYPES.get(sl.get_dtype())
        got_shape = tuple(sl.get_shape())
        if got_dt != dt or got_shape != shape:
            raise WeightFileError(f"{path}: tensor key {key!r} is {sl.get_dtype()} {got_shape}, expected "
                                  f"{dtype_name(dt)} {shape}")
        rec = entry["tensors"].get(key)
        if rec != dict(dtype=dtype_name(dt), shape=list(shape)):
            raise WeightFileError(f"{path}: manifest record of tensor key {key!r} is {rec!r}, expected "
                                  f"{dtype_name(dt)} {list(shape)}")
    extra = sorted(keys - set(spec))
    if extra:
        raise WeightFileError(f"{path}: unexpected tensor keys {extra} for format {header['format']!r}")


def _read_tensor(path: str, f, key: str, dtype: torch.dtype, shape: Tuple[int, ...],
                 order: Optional[torch.Tensor], mmap: bool = False, check_finite: bool = True,
                 weight_format: Optional[WeightFormat] = None,
                 experts: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    try:
        if order is None:
            t = f.get_tensor(key)  # a view of safetensors' (copy-on-write) mapping of the file
            if experts is not None:  # a block of the experts: only its pages are ever touched
                t = t[experts[0]:experts[1]]
                shape = (experts[1] - experts[0],) + tuple(shape[1:])
            if not mmap:  # owned memory: the file may change or vanish afterwards
                t = t.clone()
        else:  # expert by expert into the destination: no second full copy for the permutation
            sl = f.get_slice(key)
            t = torch.empty(shape, dtype=dtype)
            for p, e in enumerate(order.tolist()):
                t[p].copy_(sl[e])
    except Exception as e:
        raise WeightFileError(f"{path}: cannot read tensor key {key!r} (truncated or corrupt file?): {e}") from e
    if t.dtype != dtype or tuple(t.shape) != shape:  # a header lying about its data
        raise WeightFileError(f"{path}: tensor key {key!r} read as {t.dtype} {tuple(t.shape)}, expected "
                              f"{dtype} {shape}")
    if t.is_floating_point() and key.endswith((".scale", ".zero")) and not bool(torch.isfinite(t).all()):
        raise WeightFileError(f"{path}: tensor key {key!r} holds non-finite values (corrupt file?)")
    if check_finite and t.is_floating_point() and key.endswith(".data"):
        from .checks import first_non_finite
        idx = first_non_finite(t)
        if idx is not None:
            raise WeightFileError(f"{path}: tensor key {key!r} holds a non-finite value at expert {idx[0]}, row "
                                  f"{idx[1] if len(idx) > 1 else '?'} (corrupt file or a NaN checkpoint?)")
    if check_finite and weight_format is not None and key.endswith(".data"):
        try:
            weight_format.check_codes(key, t)
        except ValueError as e:
            raise WeightFileError(f"{path}: tensor key {e} (corrupt file or a NaN checkpoint?)") from e
    return t.contiguous()


def read_layer(folder: str, layer_idx: int, weight_format: WeightFormat, E: int, H: int, I: int,
               group_size: int = 128, order: Optional[torch.Tensor] = None, *,
               checksum: Optional[bool] = None, mmap: bool = False,
               check_finite: bool = True, experts: Optional[Tuple[int, int]] = None) -> Tuple[Packed, Packed, Packed]:
    """Reads layer `layer_idx` of a weight folder as (gate, up, down) `Packed` for `weight_format`.

    order: None, or an int64 tensor [E] with order[p] = the file's expert that goes to slot p.
    experts: None (all E), or (first, end): only the file's experts first .. end - 1 (expert parallelism: one
    rank's block; the layer then has end - first experts). Not with order.
    checksum: also verify the file's sha256 against the manifest (default: $KTMOE_WEIGHTS_CHECKSUM == "1";
    the file's size is always checked). mmap=False (default): the tensors are copied out of the file into
    memory they own; mmap=True: they stay views of the file's mapping (the caller must detect a changed
    file: stat_key). check_finite: bf16 codes are checked for NaN/Inf (scales and zeros always are).
    Returns only fully read, validated tensors; raises
    FileNotFoundError / WeightFileError (ValueError) naming the file and key otherwise."""
    folder = os.fspath(folder)
    m = read_manifest(folder)
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    _check_manifest_matches(manifest_path, m, weight_format, E, H, I, group_size)
    entry = _layer_entry(manifest_path, m, layer_idx)
    path = os.path.join(folder, entry["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: layer {layer_idx}'s weight file is missing (listed in {manifest_path})")
    size = os.path.getsize(path)
    if isinstance(entry.get("size"), int) and size != entry["size"]:
        raise WeightFileError(f"{path}: file is {size} bytes but the manifest records {entry['size']} "
                              "(truncated or replaced file); convert this layer again")
    if checksum is None:
        checksum = os.environ.get(CHECKSUM_ENV, "") == "1"
    if checksum and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
        raise WeightFileError(f"{path}: sha256 differs from the manifest's (corrupt file); convert this layer "
                              "again")
    if experts is not None:
        if order is not None:
            raise ValueError("read_layer(): order= and experts= do not combine")
        first, end = experts
        if not (0 <= first < end <= E):
            raise ValueError(f"experts=({first}, {end}) is not a block of the file's {E} experts")
    if order is not None:
        order = torch.as_tensor(order).to("cpu", torch.int64)
        if order.shape != (E,) or (E and (int(order.min()) < 0 or int(order.max()) >= E)):
            raise ValueError(f"order must be an int64 tensor of shape ({E},) with values in [0, {E})")
    block = _manifest_block_size(manifest_path, m, weight_format)
    spec = expected_tensors(weight_format, E, H, I, group_size, block)
    header = {k: m.get(k) for k in ("layout_version", "format", "format_version", "group_size", "num_experts",
                                    "hidden_size", "moe_intermediate_size")}
    if block is not None:
        header["block_size"] = block
    out: List[Packed] = []
    before = stat_key(path)
    with _open(path) as f:
        _check_file(path, f, entry, spec, header, layer_idx)
        for which, shape in zip(PROJECTIONS, expert_shapes(E, H, I)):
            parts = {}
            for part in PARTS:
                key = f"{which}.{part}"
                parts[part] = (_read_tensor(path, f, key, *spec[key], order, mmap, check_finite, weight_format,
                                            experts) if key in spec else None)
            if experts is not None:
                shape = (experts[1] - experts[0],) + tuple(shape[1:])
            group, block_rows = _blocks_of(weight_format, shape[2], group_size, block)
            out.append(Packed(parts["data"], parts["scale"], parts["zero"], shape, group, block_rows))
    if stat_key(path) != before:
        raise WeightFileError(f"{path}: the file changed while it was read (size, mtime or inode); read it again")
    return out[0], out[1], out[2]


def verify_folder(folder: str, weight_format: Optional[WeightFormat] = None, *, checksum: bool = True,
                  layers: Optional[Iterable[int]] = None) -> List[int]:
    """Checks every (or the given) layer of a weight folder without keeping its data: manifest, file sizes,
    sha256 (with checksum=True), metadata, keys, dtypes, shapes. Returns the checked layer indices; raises
    like read_layer on the first problem. weight_format defaults to the registry's format named in the
    manifest."""
    folder = os.fspath(folder)
    m = read_manifest(folder)
    manifest_path = os.path.join(folder, MANIFEST_NAME)
    if weight_format is None:
        weight_format = format_by_name(m["format"], manifest_path)
    gs = m.get("group_size") if m.get("group_size") is not None else 128
    _check_manifest_matches(manifest_path, m, weight_format, m["num_experts"], m["hidden_size"],
                            m["moe_intermediate_size"], gs)
    E, H, I = m["num_experts"], m["hidden_size"], m["moe_intermediate_size"]
    block = _manifest_block_size(manifest_path, m, weight_format)
    spec = expected_tensors(weight_format, E, H, I, gs, block)
    header = {k: m.get(k) for k in ("layout_version", "format", "format_version", "group_size", "num_experts",
                                    "hidden_size", "moe_intermediate_size")}
    if block is not None:
        header["block_size"] = block
    todo = sorted(int(k) for k in m["layers"]) if layers is None else list(layers)
    for idx in todo:
        entry = _layer_entry(manifest_path, m, idx)
        path = os.path.join(folder, entry["file"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: layer {idx}'s weight file is missing (listed in {manifest_path})")
        if os.path.getsize(path) != entry.get("size"):
            raise WeightFileError(f"{path}: file is {os.path.getsize(path)} bytes but the manifest records "
                                  f"{entry.get('size')} (truncated or replaced file)")
        if checksum and file_sha256(path) != entry.get("sha256"):
            raise WeightFileError(f"{path}: sha256 differs from the manifest's (corrupt file)")
        with _open(path) as f:
            _check_file(path, f, entry, spec, header, idx)
    return todo


def format_by_name(name: str, where: str = "") -> WeightFormat:
    """The registered WeightFormat whose .name is `name` (ktmoe.formats.FORMATS)."""
    if name not in FORMATS:
        raise WeightFileError(f"{where + ': ' if where else ''}unknown weight format {name!r} "
                              f"(known: {sorted(FORMATS)})")
    return FORMATS[name]
