"""BaseSFTMoEWrapper: the pure-Python composition of the native stages for one MoE layer.

It owns the layer description handed to C (dims, weight views per TP part, LoRA addresses), checks every
argument before anything reaches native code, moves tensors to and from the caller's device, and splits
batches larger than `chunked_prefill_size` into chunks transparently. The weight format comes in through
the constructor (the factory, ktmoe.experts, picks it from the method); nothing here changes when a method
is added."""
from __future__ import annotations

import math
import os
import sys
import threading
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _core
from .. import checks
from ..engine import get_engine
from ..formats import Packed, WeightFormat, expert_shapes
from ..lora import LORA_NAMES, lora_shapes
from ..weights_io import read_layer, read_manifest

_FLOAT_INPUTS = (torch.bfloat16, torch.float32, torch.float16)
_ID_DTYPES = (torch.int64, torch.int32)
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, shape: Sequence[int], dtypes: Sequence[torch.dtype]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_has_data(name: str, t: torch.Tensor) -> None:
    if t.device.type == "meta":
        raise ValueError(f"{name} is on device meta (no data); expected a tensor with data on the cpu or an "
                         "accelerator (materialize it first, e.g. with to_empty() and a load)")


def is_dtensor(t) -> bool:
    # torch.distributed.tensor not imported yet: no DTensor can exist (and importing it costs ~0.1 s)
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, getattr(mod, "DTensor", ()))


def check_lora_storage(name: str, t: torch.Tensor) -> None:
    """The native side reads a LoRA tensor by address: a sharded DTensor or freed storage is refused here
    (either would be read as a null or dangling pointer)."""
    if is_dtensor(t):
        raise ValueError(f"{name} is a DTensor (sharded by FSDP2 fully_shard or tensor parallel, placements "
                         f"{tuple(t.placements)}): the CPU experts need the whole local tensor. Call them through "
                         "the fully_shard-ed module that owns them (its forward gathers the parameters), or "
                         "unshard it first (fsdp_module.unshard())")
    if t.numel() > 0 and t.device.type == "cpu" and t.data_ptr() == 0:
        raise ValueError(f"{name} has no storage ({_describe(t)}, data_ptr 0): it was freed, e.g. resharded by "
                         "FSDP2 after the forward; gather it again before calling the experts")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors use the same storage (a view, or the same tensor)."""
    if a.device.type != "cpu" or b.device.type != "cpu":
        return False
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except RuntimeError:
        return False


def _check_width(name: str, t, cols: int, hint: str) -> None:
    """t must be a 2-D tensor [T, cols]; T is whatever the first input says."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[1] != cols:
        got = _describe(t) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape [T, {cols}]{hint}, got {got}")


_CPU = torch.device("cpu")


class SavedForward(NamedTuple):
    """What backward needs from one forward: per chunk (native context, first token, end token), and the
    input's T, dtype and device. (Tuples: this is built on every call, right after the caches went cold.)"""

    chunks: List[Tuple[_core.Context, int, int]]
    T: int
    dtype: torch.dtype
    device: torch.device
    weights_gen: int  # which load of the frozen weights the activations were computed with


class BaseSFTMoEWrapper:
    """Routed experts of one MoE layer on the CPU, forward and backward with LoRA."""

    method: str = "?"
    trains = True

    def __init__(self, *, weight_format: WeightFormat, layer_idx: int, num_experts: int, num_experts_per_tok: int,
                 hidden_size: int, moe_intermediate_size: int, num_gpu_experts: int = 0,
                 cpuinfer_threads: Optional[int] = None, threadpool_count: int = 1, weight_path: Optional[str] = None,
                 chunked_prefill_size: int = 4096, lora_rank: int = 16, lora_alpha: float = 32.0,
                 lora_dropout: float = 0.0, group_size: int = 128,
                 subpool_cpus: Optional[Sequence[Sequence[int]]] = None, numa_local: Optional[bool] = None,
                 activation_quant: Optional[str] = None, method: Optional[str] = None):
        """weight_format: how the frozen weights are stored (the factory passes the method's format); the
        other arguments are KTMoEWrapper's.

        activation_quant: None, or "int8" for the W8A8 forward: the base-weight GEMMs of the forward (gate,
        up, down) take int8 activations, quantized per token (x) and per (token, expert) pair (h), symmetric
        and dynamic, against the int8 codes of per-row int8/int4/int4_1 weights. LoRA terms and the backward
        (a straight-through estimator: the unquantized function's backward) are unchanged."""
        if not isinstance(weight_format, WeightFormat):
            raise TypeError(f"weight_format must be a ktmoe.formats.WeightFormat, got "
                            f"{type(weight_format).__name__}")
        ints = dict(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, hidden_size=hidden_size,
                    moe_intermediate_size=moe_intermediate_size, chunked_prefill_size=chunked_prefill_size,
                    threadpool_count=threadpool_count)
        for name, v in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
            if v > _INT32_MAX:
                raise ValueError(f"{name}={v} exceeds the native limit 2**31 - 1")
        if chunked_prefill_size * num_experts_per_tok > _INT32_MAX:
            raise ValueError(f"chunked_prefill_size={chunked_prefill_size} x num_experts_per_tok="
                             f"{num_experts_per_tok} exceeds the native limit 2**31 - 1 routed pairs per chunk; "
                             "pick a smaller chunked_prefill_size")
        if not isinstance(layer_idx, int) or isinstance(layer_idx, bool) or layer_idx < 0:
            raise ValueError(f"layer_idx must be a non-negative int, got {layer_idx!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if num_experts_per_tok > num_experts:
            raise ValueError(f"num_experts_per_tok={num_experts_per_tok} exceeds num_experts={num_experts}")
        if num_gpu_experts != 0:
            raise ValueError(f"num_gpu_experts={num_gpu_experts}: only 0 is supported (all routed experts "
                             "run on the CPU)")
        if not isinstance(lora_rank, int) or not 0 <= lora_rank <= 256:
            raise ValueError(f"lora_rank must be an int in [0, 256], got {lora_rank!r}")
        if lora_dropout != 0.0:
            raise ValueError(f"lora_dropout={lora_dropout}: only 0.0 is supported by the CPU experts")
        if cpuinfer_threads is not None and (not isinstance(cpuinfer_threads, int) or cpuinfer_threads < 1):
            raise ValueError(f"cpuinfer_threads must be None or a positive int, got {cpuinfer_threads!r}")
        self.activation_quant = self._check_activation_quant(activation_quant, weight_format, method)
        if moe_intermediate_size % threadpool_count != 0:
            raise ValueError(
                f"moe_intermediate_size={moe_intermediate_size} is not divisible by "
                f"threadpool_count={threadpool_count}: each TP subpool needs an equal slice")
        self.weight_format = weight_format
        self.layer_idx = layer_idx
        self.E, self.k, self.H, self.I = num_experts, num_experts_per_tok, hidden_size, moe_intermediate_size
        self.P = threadpool_count
        self.weight_path = weight_path
        self.chunk = chunked_prefill_size
        self.lora_rank, self.lora_alpha = lora_rank, float(lora_alpha)
        self.lora_scale = self.lora_alpha / lora_rank if lora_rank > 0 else 0.0
        self.group_size = group_size
        self._numa_local = numa_local  # None: copy each TP part's weights to its node when subpools span nodes
        if method is not None:
            self.method = method
        self._engine = get_engine(cpuinfer_threads, threadpool_count, subpool_cpus)
        slice_ = self.I // self.P
        self.part_i0 = [p * slice_ for p in range(self.P + 1)]
        self._layer = _core.Layer(self.E, self.k, self.H, self.I, 0, 0.0, self.part_i0)
        self._layer.set_act_quant(_core.ACT_QUANT[self.activation_quant])
        self._weights: Optional[Tuple[object, object, object]] = None
        self._part_weights: Optional[list] = None  # per-part node-local copies (multi-node TP)
        self._lora_user: Optional[Tuple[torch.Tensor, ...]] = None  # what init_lora_weights was given
        self._lora: Optional[Tuple[torch.Tensor, ...]] = None       # fp32 contiguous, read by C in place
        self._lora_ptrs: Tuple[int, ...] = ()
        self._lora_shape_list = list(self.lora_shapes().values())
        self._grad_buffers: Optional[List[torch.Tensor]] = None
        self._saved: Optional[SavedForward] = None
        self._scratch_ctx = _core.Context()  # reused by calls that save nothing (under self._lock)
        # One call at a time per wrapper: the scratch context, the bound weights/LoRA and _saved are shared
        # state, and the engine runs one layer call at a time anyway. Reentrant: forward_sft -> _run_forward.
        self._lock = threading.RLock()
        self._weights_gen = 0      # bumped by every weight load; a backward checks its forward's
        self._mapped: Optional[Tuple[str, tuple]] = None  # (path, stat key) when loaded with mmap=True

    @staticmethod
    def _check_activation_quant(mode, weight_format: WeightFormat, method: Optional[str]) -> Optional[str]:
        if mode not in _core.ACT_QUANT:
            valid = ", ".join(repr(m) for m in _core.ACT_QUANT)
            raise ValueError(f"activation_quant must be one of {valid}, got {mode!r}")
        if mode is not None and not weight_format.int8_activations:
            what = f"method {method}" if method else f"weight format {weight_format.name}"
            layout = ("bf16 weights" if weight_format.bits == 16 else
                      "one scale per group_size columns (K-groups)" if weight_format.per_group else
                      f"{weight_format.name} weights")
            raise ValueError(f"activation_quant={mode!r} (W8A8) needs int8 codes with one scale per output row: "
                             f"the per-row int8, int4 and int4_1 methods (AMXINT8_SFT, AMXINT4_SFT, "
                             f"AMXINT4_1_SFT and their inference names); {what} has {layout}")
        return mode

    # ---- weights ----
    def load_weights_from_tensors(self, gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor,
                                  physical_to_logical_map: Optional[torch.Tensor] = None) -> None:
        """gate_proj, up_proj: [E, I, H]; down_proj: [E, H, I] (out x in, like nn.Linear.weight)."""
        names = ("gate_proj", "up_proj", "down_proj")
        given = (gate_proj, up_proj, down_proj)
        for name, t, shape in zip(names, given, expert_shapes(self.E, self.H, self.I)):
            check_tensor(name, t, shape, _FLOAT_INPUTS)
            check_has_data(name, t)
        if checks.finite_checks():  # before packing: a quantizer would turn a NaN row into zeros
            for name, t in zip(names, given):
                checks.check_finite_weight(name, t.detach())
        order = None
        if physical_to_logical_map is not None:
            order = self._check_expert_map(physical_to_logical_map)
        fmt = self.weight_format
        packed = []
        for src in given:  # one projection at a time: at most one projection's extra copy during the load
            t = src if order is None else src[order]
            p = fmt.pack(t, self.group_size)
            # the wrapper owns what it reads: a packed tensor still sharing the caller's memory (bf16 in place)
            # is copied, so the caller may reuse, zero or resize its tensor afterwards
            for part in ("data", "scale", "zero"):
                v = getattr(p, part)
                if v is not None and _shares_memory(v, src):
                    setattr(p, part, v.clone())
            packed.append(p)
            del t
        self._bind_weights(tuple(packed))

    def load_packed_weights(self, gate, up, down, *, source_format=None,
                            physical_to_logical_map: Optional[torch.Tensor] = None, copy: bool = True) -> None:
        """Loads weights that are already quantized: three `ktmoe.formats.Packed` (gate, up [E, I, H], down
        [E, H, I]), e.g. a checkpoint's own codes and scales adopted with `FORMATS[name].adopt(...)` or
        `ktmoe.formats.compressed_tensors.adopt_pack_quantized(...)`.

        source_format: the format (a name of ktmoe.formats.FORMATS, or the instance) the Packed tensors are in;
        default the method's own. The same format is bound as it is, bit for bit, with the block / group shape
        the tensors carry (an adopted group of 32 stays 32, whatever group_size says). Another format is
        converted from its dequantized values (pack() of the method's format with this wrapper's group_size),
        one projection at a time; a pair that cannot be converted raises ValueError naming the argument. The
        wrapper copies what it keeps: the caller may free or reuse its tensors afterwards. copy=False (same format,
        no map, contiguous tensors): the wrapper takes the given tensors as they are, without a second copy of the
        layer (a streaming loader that filled them for this wrapper; the caller must not write them afterwards)."""
        from ..formats import FORMATS

        fmt = self.weight_format
        src = fmt if source_format is None else source_format
        if isinstance(src, str):
            if src not in FORMATS:
                raise ValueError(f"source_format={src!r} is not a known weight format; known: {sorted(FORMATS)}")
            src = FORMATS[src]
        if not isinstance(src, WeightFormat):
            raise TypeError(f"source_format must be a format name or a ktmoe.formats.WeightFormat, got "
                            f"{type(src).__name__}")
        names = ("gate", "up", "down")
        given = (gate, up, down)
        for name, p, shape in zip(names, given, expert_shapes(self.E, self.H, self.I)):
            src.check_packed(name, p, shape)
        order = None if physical_to_logical_map is None else self._check_expert_map(physical_to_logical_map)
        same = src.name == fmt.name
        packed = []
        for name, p in zip(names, given):
            if same:
                take = not copy and order is None
                part = lambda t: None if t is None else (  # noqa: E731
                    t if take else t.clone() if order is None else t[order])
                packed.append(Packed(part(p.data).contiguous(), part(p.scale), part(p.zero), tuple(p.shape),
                                     p.group, p.block_rows))
                continue
            w = src.dequantize(p)
            if order is not None:
                w = w[order]
            try:
                packed.append(fmt.pack(w, self.group_size))
            except ValueError as e:
                raise ValueError(f"source_format={src.name!r} -> method {self.method} (format {fmt.name!r}): "
                                 f"{name} cannot be converted: {e}") from e
            del w
        self._bind_weights(tuple(packed))

    def load_weights(self, physical_to_logical_map: Optional[torch.Tensor] = None, *, mmap: bool = False,
                     experts: Optional[Tuple[int, int]] = None) -> None:
        """Loads this layer from `weight_path`, a folder written by `python -m ktmoe.convert` (see
        docs/weight_format.md). physical_to_logical_map[p] names the file's expert that goes to slot p.

        By default the layer is read into memory the wrapper owns: the file may be rewritten or deleted
        afterwards. mmap=True keeps the file memory-mapped instead (pages shared by every process mapping
        it); each call then checks the file's size, mtime and inode and raises if it changed, but a file
        truncated *during* a call can still end the process with SIGBUS: that is the price of mapping.
        Mapped weights are used where they are: TP subpools on several NUMA nodes read the one mapping (no
        node-local copies; numa_local=True is refused), and physical_to_logical_map (a permuted copy) is
        refused.

        experts=(first, end): this layer holds the file's experts first .. end - 1 (expert parallelism: one
        rank's block; num_experts must be end - first); only their bytes are read (or mapped)."""
        if self.weight_path is None:
            raise ValueError("load_weights() needs weight_path= (a folder of pre-converted weights); "
                             "use load_weights_from_tensors() to load from tensors")
        if mmap and self._numa_local:
            raise ValueError("load_weights(mmap=True) shares the file's pages, numa_local=True copies them to "
                             "each TP subpool's node; pass numa_local=False (or None) or drop mmap=True")
        if mmap and physical_to_logical_map is not None:
            raise ValueError("load_weights(mmap=True) cannot take physical_to_logical_map: the experts would be "
                             "copied in the new order, nothing would be shared")
        order = None if physical_to_logical_map is None else self._check_expert_map(physical_to_logical_map)
        file_E = self.E
        if experts is not None:
            first, end = experts
            if end - first != self.E:
                raise ValueError(f"experts=({first}, {end}) is {end - first} experts, this layer has "
                                 f"num_experts={self.E}")
            file_E = int(read_manifest(self.weight_path).get("num_experts", -1))
        packed = read_layer(self.weight_path, self.layer_idx, self.weight_format, file_E, self.H, self.I,
                            self.group_size, order, mmap=mmap, check_finite=checks.finite_checks(),
                            experts=experts)
        mapped = None
        if mmap:
            from ..weights_io import layer_path, stat_key
            path = layer_path(self.weight_path, self.layer_idx)
            mapped = (path, stat_key(path))
        self._bind_weights(packed, mapped)

    def _check_expert_map(self, m) -> torch.Tensor:
        m = torch.as_tensor(m).to("cpu")
        if m.shape != (self.E,) or m.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"physical_to_logical_map must be an int tensor of shape ({self.E},), "
                             f"got {_describe(m)}")
        if int(m.min()) < 0 or int(m.max()) >= self.E:
            raise ValueError(f"physical_to_logical_map values must be in [0, {self.E})")
        return m.long()

    def _bind_weights(self, packed: Tuple[object, object, object], mapped: Optional[Tuple[str, tuple]] = None
                      ) -> None:
        """mapped: (path, stat key) when `packed` are views of a mapped weight file (checked on every call)."""
        # every view is built (and checked) before the native layer sees any: a failure leaves it as it was
        fmt = self.weight_format
        names = ("gate", "up", "down")
        for which, w in zip(names, packed):
            for p in range(self.P):
                fmt.check_tp(which, w.shape[2], w.group, self.part_i0[p])
        parts = None if mapped is not None else self._node_local_parts(packed)  # copies would undo the sharing
        if parts is None:
            views = [(p, which, fmt.view(w, which, self.part_i0[p])) for p in range(self.P)
                     for which, w in zip(names, packed)]
        else:
            views = [(p, which, fmt.view(w, which, 0)) for p in range(self.P) for which, w in zip(names, parts[p])]
        with self._lock:  # never while another thread's call reads the old weights
            for p, which, v in views:
                self._layer.set_weight(p, which, v.fmt, v.data_ptr, v.scale_ptr, v.zero_ptr, v.rows, v.cols,
                                       v.row0, v.col0, v.group, v.block_rows)
            self._weights, self._part_weights = (packed, None) if parts is None else (None, parts)
            self._weights_gen += 1
            self._mapped = mapped

    def _node_local_parts(self, packed):
        """Per-part copies of the weights, each written by its subpool's threads so that first touch puts
        it on that subpool's NUMA node; None when the subpools share one node (or numa_local=False)."""
        local = self._numa_local
        if local is None:
            local = self.P > 1 and len({n for n in self._engine.numa_nodes if n >= 0}) > 1
        if not local:
            return None
        core = self._engine.core

        def gather_on(p):
            def gather(view: torch.Tensor) -> torch.Tensor:
                dst = torch.empty(view.shape, dtype=view.dtype)  # untouched pages: placed by the first write
                es = view.element_size()
                E, a, b = view.shape
                if view.stride(2) != 1:
                    raise ValueError("a weight slice must have contiguous rows")
                if view.stride(1) == b:  # one contiguous block per expert
                    core.part_copy(p, dst.data_ptr(), view.data_ptr(), E, view.stride(0) * es, 1, 0, a * b * es)
                else:
                    core.part_copy(p, dst.data_ptr(), view.data_ptr(), E, view.stride(0) * es, a,
                                   view.stride(1) * es, b * es)
                return dst
            return gather

        fmt = self.weight_format
        return [tuple(fmt.part_slice(w, which, self.part_i0[p], self.part_i0[p + 1], gather_on(p))
                      for which, w in zip(("gate", "up", "down"), packed)) for p in range(self.P)]

    def weight_nbytes(self) -> int:
        fmt = self.weight_format
        if self._part_weights is not None:
            return sum(fmt.nbytes(w) for part in self._part_weights for w in part)
        return 0 if self._weights is None else sum(fmt.nbytes(w) for w in self._weights)

    def dequantized_weights(self, exact: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen weights as the kernels see them (fp32), for tests and references: the bf16 values the
        bf16 products use, or with exact=True scale * code (+ zero) unrounded, as the int8 products of the
        W8A8 forward (activation_quant="int8") use them."""
        self._require_weights()
        fmt = self.weight_format
        if self._part_weights is None:
            return tuple(fmt.dequantize(w, exact) for w in self._weights)  # type: ignore[return-value]
        per_part = [[fmt.dequantize(w, exact) for w in part] for part in self._part_weights]
        return (torch.cat([pp[0] for pp in per_part], dim=1), torch.cat([pp[1] for pp in per_part], dim=1),
                torch.cat([pp[2] for pp in per_part], dim=2))

    # ---- LoRA ----
    def lora_shapes(self) -> Dict[str, Tuple[int, int, int]]:
        return lora_shapes(self.E, self.H, self.I, self.lora_rank)

    def init_lora_weights(self, gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b) -> None:
        """Binds the six LoRA tensors. fp32 contiguous CPU tensors are read in place (an optimizer updating
        them is seen by the next call); others are copied, and update_lora_weights() re-reads them."""
        if self.lora_rank == 0:
            raise ValueError("this wrapper was built with lora_rank=0")
        given = (gate_lora_a, gate_lora_b, up_lora_a, up_lora_b, down_lora_a, down_lora_b)
        self._check_lora(given)
        with self._lock:
            self._lora_user = tuple(given)
            self.update_lora_weights()

    def _check_lora(self, tensors) -> None:
        """Shape, dtype, device (and, with the finite checks on, values) of the six LoRA tensors."""
        shapes = self.lora_shapes()
        for name, t in zip(LORA_NAMES, tensors):
            check_tensor(name, t, shapes[name], _FLOAT_INPUTS)
            check_has_data(name, t)
            check_lora_storage(name, t)
        if checks.finite_checks():
            for name, t in zip(LORA_NAMES, tensors):
                checks.check_finite_weight(name, t.detach())

    def update_lora_weights(self) -> None:
        """Re-reads the LoRA tensors given to init_lora_weights (needed only when they were copied)."""
        if self._lora_user is None:
            raise RuntimeError("update_lora_weights() before init_lora_weights()")
        self._check_lora(self._lora_user)  # they may have been replaced or resized since init_lora_weights
        lora = []
        for t in self._lora_user:
            t = t.detach()
            if t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous():
                lora.append(t)
            else:
                lora.append(t.to(device="cpu", dtype=torch.float32).contiguous())
        self._bind_lora(tuple(lora))

    def _bind_lora(self, lora: Tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            self._lora = lora
            self._lora_ptrs = tuple(t.data_ptr() for t in lora)
            self._layer.set_lora(self.lora_rank, self.lora_scale, *self._lora_ptrs)

    @property
    def lora_tensors(self) -> Optional[Dict[str, torch.Tensor]]:
        return None if self._lora is None else dict(zip(LORA_NAMES, self._lora))

    # ---- checks ----
    def _require_weights(self) -> None:
        """Before reading the frozen weights: loaded and, when mapped, the file unchanged (see load_weights)."""
        if self._weights is None and self._part_weights is None:
            raise RuntimeError("weights are not loaded: call load_weights_from_tensors() or load_weights() first")
        if self._mapped is not None:
            self._check_mapped()

    def _check_inputs(self, hidden_states, expert_ids, weights) -> int:
        """T, after checking the three inputs (fast path first; the slow path builds the message)."""
        try:
            T = hidden_states.shape[0]
            if (hidden_states.shape == (T, self.H) and hidden_states.dtype in _FLOAT_INPUTS
                    and expert_ids.shape == (T, self.k) and expert_ids.dtype in _ID_DTYPES
                    and weights.shape == (T, self.k) and weights.dtype in _WEIGHT_DTYPES
                    and (hidden_states.is_cpu and expert_ids.is_cpu and weights.is_cpu  # no device objects
                         or expert_ids.device == hidden_states.device == weights.device
                         and hidden_states.device.type != "meta")):
                return T
        except (AttributeError, IndexError, TypeError):
            pass
        _check_width("hidden_states", hidden_states, self.H, "")
        T = hidden_states.shape[0]
        check_tensor("hidden_states", hidden_states, (T, self.H), _FLOAT_INPUTS)
        _check_width("expert_ids", expert_ids, self.k, " (k = num_experts_per_tok)")
        check_tensor("expert_ids", expert_ids, (T, self.k), _ID_DTYPES)
        check_tensor("weights", weights, (T, self.k), _WEIGHT_DTYPES)
        for name, t in (("expert_ids", expert_ids), ("weights", weights)):
            if t.device != hidden_states.device:
                raise ValueError(f"{name} is on {t.device} but hidden_states is on {hidden_states.device}")
        if hidden_states.device.type == "meta":
            raise ValueError("hidden_states is on device meta (no data); expected a tensor with data "
                             "on the cpu or an accelerator")
        return T

    def _lora_ready(self) -> bool:
        lora = self._lora
        if lora is None:
            return False
        if (lora[0].data_ptr(), lora[1].data_ptr(), lora[2].data_ptr(), lora[3].data_ptr(), lora[4].data_ptr(),
                lora[5].data_ptr()) != self._lora_ptrs:  # storage replaced (resize_, set_): check, then rebind
            for name, t, shape in zip(LORA_NAMES, lora, self._lora_shape_list):
                if t.shape != shape or t.dtype is not torch.float32 or not t.is_contiguous():
                    raise ValueError(f"{name} changed under the wrapper to {_describe(t)}; expected shape {shape}, "
                                     "float32, contiguous: call init_lora_weights() with the new tensors")
                check_lora_storage(name, t)
            self._bind_lora(lora)
        return True

    # ---- forward / backward ----
    @staticmethod
    def _to_native(t: torch.Tensor) -> Tuple[torch.Tensor, bool]:
        """A CPU, contiguous bf16 or fp32 tensor and whether it is fp32."""
        if t.dtype is not torch.bfloat16 and t.dtype is not torch.float32:
            t = t.float()
        t = BaseSFTMoEWrapper._cpu_contiguous(t)
        return t, t.dtype is torch.float32

    @staticmethod
    def _cpu_contiguous(t: torch.Tensor) -> torch.Tensor:
        if not t.is_cpu:
            t = t.to("cpu")
        return t if t.is_contiguous() else t.contiguous()

    def _check_mapped(self) -> None:
        path, key = self._mapped
        from ..weights_io import stat_key
        try:
            now = stat_key(path)
        except OSError as e:
            raise RuntimeError(f"{path}: the weight file mapped by load_weights(mmap=True) is gone ({e}); "
                               "call load_weights() again") from None
        if now != key:
            raise RuntimeError(f"{path}: the weight file mapped by load_weights(mmap=True) changed since it was "
                               "loaded (size, mtime or inode); call load_weights() again")

    def _check_output(self, what: str, t: torch.Tensor) -> None:
        """After a call: an output that turned non-finite is reported, naming the LoRA tensor at fault when
        one holds NaN/Inf (an optimizer step can put them there)."""
        if t.numel() == 0 or bool(torch.isfinite(checks.max_abs(t))):
            return
        if self._lora is not None:
            for name, lt in zip(LORA_NAMES, self._lora):
                if checks.first_non_finite(lt) is not None:
                    checks.check_finite_weight(name, lt, " (bound LoRA tensor)")
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"layer {self.layer_idx}: the {what} turned non-finite at {bad} (overflow in the experts; "
                         "weights, LoRA and inputs are finite)")

    def _run_forward(self, hidden_states, expert_ids, weights, save: bool) -> Tuple[torch.Tensor, Optional[SavedForward]]:
        with self._lock:
            return self._run_forward_locked(hidden_states, expert_ids, weights, save)

    def _run_forward_locked(self, hidden_states, expert_ids, weights, save):
        self._require_weights()
        T = self._check_inputs(hidden_states, expert_ids, weights)
        if not self._lora_ready() and self.lora_rank > 0 and self.trains and save:
            raise RuntimeError("LoRA weights are not initialised: call init_lora_weights() before training")
        if T > _INT32_MAX:
            raise ValueError(f"hidden_states has {T} rows, more than the native limit 2**31 - 1")
        check = checks.finite_checks()
        if check and hidden_states.dtype is torch.float32:  # NaN/Inf the kernels reject; this is bf16 overflow
            checks.check_finite_rows("hidden_states", hidden_states, checks.BF16_OVERFLOW)
        x, x_f32 = self._to_native(hidden_states)
        ids = self._cpu_contiguous(expert_ids)
        w = self._cpu_contiguous(weights)
        out = torch.empty((T, self.H), dtype=x.dtype)
        ids_i32, w_bf16 = ids.dtype is torch.int32, w.dtype is torch.bfloat16
        # chunk t0 starts at these byte offsets (no slicing: views cost microseconds)
        x_row = self.H * (4 if x_f32 else 2)
        ids_row, w_row = self.k * (4 if ids_i32 else 8), self.k * (2 if w_bf16 else 4)
        x_ptr, ids_ptr, w_ptr, out_ptr = x.data_ptr(), ids.data_ptr(), w.data_ptr(), out.data_ptr()
        chunks: List[Tuple[_core.Context, int, int]] = []
        nonfinite = 0
        core, layer = self._engine.core, self._layer
        for t0 in range(0, max(T, 1), self.chunk):
            t1 = min(T, t0 + self.chunk)
            ctx = _core.Context() if save else self._scratch_ctx
            ctx.plan(layer, t1 - t0, ids_ptr + t0 * ids_row, ids_i32, w_ptr + t0 * w_row, w_bf16)
            ctx.forward(layer, core, x_ptr + t0 * x_row, x_f32, out_ptr + t0 * x_row, x_f32, save)
            nonfinite |= check and ctx.nonfinite
            if save:
                chunks.append((ctx, t0, t1))
        if nonfinite:  # flagged by the kernels as they wrote the output: now find it for the message
            self._check_output("forward output", out)
        if hidden_states.is_cpu:  # (no device object: every call here runs on cold caches)
            dev = _CPU
            y = out if out.dtype is hidden_states.dtype else out.to(hidden_states.dtype)
        else:
            dev = hidden_states.device
            y = out.to(dtype=hidden_states.dtype, device=dev)
        saved = SavedForward(chunks, T, hidden_states.dtype, dev, self._weights_gen) if save else None
        return y, saved

    def _run_backward(self, saved: SavedForward, grad_output: torch.Tensor, reuse_grads: bool = False,
                      lora: Optional[Sequence[torch.Tensor]] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """lora: the six LoRA tensors the forward used, as they are now (autograd's saved tensors). They are
        bound for this backward when their addresses differ from the bound ones (storage freed and
        re-allocated since the forward: FSDP2 resharding; or another binding since), then the binding is
        put back, so the next forward sees what it saw before."""
        with self._lock:
            if lora is None or self._lora is None or self.lora_rank == 0:
                return self._run_backward_locked(saved, grad_output, reuse_grads)
            now = []
            for name, t in zip(LORA_NAMES, lora):
                t = t.detach()
                check_lora_storage(name, t)
                if t.dtype is not torch.float32 or not t.is_cpu or not t.is_contiguous():
                    t = t.to(device="cpu", dtype=torch.float32).contiguous()  # what the forward's copy held
                now.append(t)
            ptrs = tuple(t.data_ptr() for t in now)
            if ptrs == self._lora_ptrs:
                return self._run_backward_locked(saved, grad_output, reuse_grads)
            self._layer.set_lora(self.lora_rank, self.lora_scale, *ptrs)
            try:
                return self._run_backward_locked(saved, grad_output, reuse_grads)
            finally:  # (the old addresses are only stored, not read: the next forward re-validates them)
                self._layer.set_lora(self.lora_rank, self.lora_scale, *self._lora_ptrs)

    def _run_backward_locked(self, saved, grad_output, reuse_grads):
        if saved is None:
            raise RuntimeError("backward() needs a forward_sft(..., save_for_backward=True) first")
        if saved.weights_gen != self._weights_gen:
            raise RuntimeError(f"layer {self.layer_idx}: the frozen weights were replaced (load_weights*) between "
                               "this forward and its backward; run the forward again after loading")
        if self._mapped is not None:
            self._check_mapped()
        T = saved.T
        check_tensor("grad_output", grad_output, (T, self.H), _FLOAT_INPUTS)
        check_has_data("grad_output", grad_output)
        check = checks.finite_checks()
        if check and grad_output.dtype is torch.float32:
            checks.check_finite_rows("grad_output", grad_output, checks.BF16_OVERFLOW)
        dy, dy_f32 = self._to_native(grad_output)
        dx = torch.empty((T, self.H), dtype=dy.dtype)
        dw = torch.empty((T, self.k), dtype=torch.float32)
        has_lora = self._lora is not None and self.lora_rank > 0
        shapes = self._lora_shape_list
        if not has_lora:
            grads = []
        elif reuse_grads:  # the same buffers every step: no allocator round trips for E * r * (3H + 3I) floats
            if self._grad_buffers is None:
                self._grad_buffers = [torch.empty(sh, dtype=torch.float32) for sh in shapes]
            grads = self._grad_buffers
        else:
            grads = [torch.empty(sh, dtype=torch.float32) for sh in shapes]
        ptrs = [g.data_ptr() for g in grads] if has_lora else None
        extra = [torch.empty(sh, dtype=torch.float32) for sh in shapes] if has_lora and len(saved.chunks) > 1 else []
        row = self.H * (4 if dy_f32 else 2)
        dy_ptr, dx_ptr, dw_ptr = dy.data_ptr(), dx.data_ptr(), dw.data_ptr()
        nonfinite = 0
        core, layer = self._engine.core, self._layer
        for i, (ctx, t0, _) in enumerate(saved.chunks):
            target = ptrs if i == 0 or not extra else [g.data_ptr() for g in extra]
            ctx.backward(layer, core, dy_ptr + t0 * row, dy_f32, dx_ptr + t0 * row, dy_f32, dw_ptr + t0 * self.k * 4,
                         target)
            nonfinite |= check and ctx.nonfinite
            if i > 0 and extra:
                for g, e in zip(grads, extra):
                    g += e
        if nonfinite or (check and extra):  # the kernels flag NaN/Inf as they write; chunk sums may overflow
            self._check_output("grad_input", dx)
            self._check_output("routing-weight gradient", dw)
            for name, g in zip(LORA_NAMES, grads):
                self._check_output(f"{name} gradient", g)
        dev = saved.device
        on_cpu = dev is _CPU or dev.type == "cpu"
        grad_input = dx if dx.dtype is saved.dtype and on_cpu else dx.to(dtype=saved.dtype, device=dev)
        out = dict(zip(LORA_NAMES, grads))
        out["weights"] = dw if on_cpu else dw.to(dev)
        return grad_input, out

    def forward_sft(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                    save_for_backward: bool = True) -> torch.Tensor:
        """[T, H] -> [T, H]. With save_for_backward the activations are kept for backward() (a new
        forward replaces them, as a recompute under gradient checkpointing must)."""
        with self._lock:
            y, saved = self._run_forward_locked(hidden_states, expert_ids, weights, save_for_backward)
            self._saved = saved
        return y

    def backward(self, grad_output: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns (grad_input [T, H], grads): the six LoRA grads (fp32, LoRA shapes) and "weights" [T, k].

        The LoRA grad tensors are this wrapper's own buffers, overwritten by the next backward(): use
        them (optimizer step, accumulate) or copy them before then. (The autograd path returns fresh ones.)"""
        with self._lock:
            if self._saved is None:
                raise RuntimeError("backward() needs a forward_sft(..., save_for_backward=True) first")
            return self._run_backward(self._saved, grad_output, reuse_grads=True)

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Inference: [T, H] -> [T, H], nothing saved."""
        y, _ = self._run_forward(hidden_states, expert_ids, weights, False)
        return y

    def release(self) -> None:
        """Drops saved activations and work buffers of this layer."""
        with self._lock:
            self._saved = None
            self._scratch_ctx.release()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(method={self.method!r}, layer_idx={self.layer_idx}, E={self.E}, k={self.k}, "
                f"H={self.H}, I={self.I}, r={self.lora_rank}, threadpool_count={self.P}"
                + (f", activation_quant={self.activation_quant!r})" if self.activation_quant else ")"))
