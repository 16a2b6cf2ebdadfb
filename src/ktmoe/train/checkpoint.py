"""Atomic, verifiable training checkpoints.

A checkpoint is written into a temporary sibling folder, every file fsynced, then a manifest
(`ktmoe_checkpoint.json`: size and sha256 of every file, the run's identity: config hash, seed, step, run id)
is written and fsynced last, and the folder is renamed into place (and the parent directory fsynced). A
process killed at any point leaves either the previous complete checkpoint or the new one, never a
half-written folder under the final name; temporary folders are ignored and swept by the next save.

`verify()` refuses an incomplete (no manifest, missing or short file), corrupt (hash), foreign (no
manifest at all: not written by this code) or mismatched (another run's config) checkpoint with a
`CheckpointError` whose one-line message names the problem; `find_latest()` picks the newest complete one."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any, Callable, Dict, List, Optional

MANIFEST = "ktmoe_checkpoint.json"
MANIFEST_VERSION = 1
TMP_MARK = ".tmp-"
FAULT_ENV = "KTMOE_CKPT_FAULT"  # tests: "N" kills the process (SIGKILL) at write point N of the next save

# config keys that do not change what a step computes (where output goes, logging, threads, resume itself)
# (expert_parallel too: a checkpoint holds whole tensors whatever the split, so either mode resumes it)
_NOT_IDENTITY = ("output_dir", "resume", "compare", "log_every", "save_every", "progress", "torch_threads",
                 "cpuinfer_threads", "expert_parallel")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or resumed from (one line, naming the folder and the problem)."""


def config_hash(cfg_dict: Dict[str, Any]) -> str:
    ident = {k: v for k, v in cfg_dict.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fault_point = [0]


def _fault(point: int) -> None:
    """Test hook: KTMOE_CKPT_FAULT="N" or "N:K" kills the process (-9) at write point N of the K-th save
    (default the first) of this process."""
    want = os.environ.get(FAULT_ENV)
    if not want:
        return
    n, _, k = want.partition(":")
    if int(n) == point and _fault_point[0] == int(k or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: str, write_files: Callable[[str], None], identity: Dict[str, Any]) -> None:
    """Runs write_files(tmp_folder), then publishes tmp_folder as `path` with a manifest, atomically."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    tmp = f"{path}{TMP_MARK}{os.getpid()}"
    _fault_point[0] += 1
    try:
        for name in sorted(os.listdir(parent)):  # leftovers of killed saves of this checkpoint
            if name.startswith(os.path.basename(path) + TMP_MARK):
                left = os.path.join(parent, name)
                if TMP_MARK + "old-" in name and not os.path.exists(path):
                    os.rename(left, path)  # killed between moving the old one aside and the new one in: restore
                else:
                    shutil.rmtree(left, ignore_errors=True)
        os.makedirs(tmp)
        write_files(tmp)
        _fault(1)
        files = {}
        for name in sorted(os.listdir(tmp)):
            p = os.path.join(tmp, name)
            if os.path.isfile(p):
                _fsync_path(p)
                files[name] = dict(size=os.path.getsize(p), sha256=_sha256(p))
        _fault(2)
        manifest = dict(identity, version=MANIFEST_VERSION, files=files)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        _fault(3)
        old = None
        if os.path.exists(path):  # a re-run into an old folder: the old checkpoint goes only once replaced
            old = f"{path}{TMP_MARK}old-{os.getpid()}"
            os.rename(path, old)
            _fault(4)
        os.rename(tmp, path)
        _fsync_path(parent)
        _fault(5)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise CheckpointError(f"{path}: disk full while writing the checkpoint ({e.strerror}); earlier "
                                  "checkpoints are intact: free space and resume from the latest") from None
        raise CheckpointError(f"{path}: cannot write the checkpoint: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_manifest(path: str) -> Dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"resume: {path} is not a folder")
    if not os.path.isfile(mpath):
        raise CheckpointError(f"resume: {path} is incomplete or not a ktmoe checkpoint (no {MANIFEST}: the save "
                              "was interrupted, or another tool wrote it)")
    try:
        with open(mpath) as f:
            m = json.load(f)
        if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
            raise ValueError("not a manifest")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"resume: {mpath} is unreadable ({e})") from None
    return m


def verify(path: str, cfg_dict: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The manifest of a complete checkpoint matching cfg_dict's identity; CheckpointError otherwise."""
    m = read_manifest(path)
    for name, rec in m["files"].items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise CheckpointError(f"resume: {path} is incomplete: {name} is missing")
        if os.path.getsize(p) != rec.get("size"):
            raise CheckpointError(f"resume: {path}: {name} is {os.path.getsize(p)} bytes, the manifest records "
                                  f"{rec.get('size')} (truncated or replaced file)")
        if _sha256(p) != rec.get("sha256"):
            raise CheckpointError(f"resume: {path}: {name} differs from the manifest's sha256 (corrupt, or mixed "
                                  "with another run's file)")
    if cfg_dict is not None:
        want = config_hash(cfg_dict)
        if m.get("config_hash") != want:
            raise CheckpointError(f"resume: {path} was written by another run configuration (config hash "
                                  f"{m.get('config_hash')} != {want}); resume with the same options")
    return m


def _step_of(name: str) -> Optional[int]:
    """N of checkpoint-N, and of checkpoint-N.tmp-old-PID (a complete checkpoint moved aside by a save that
    was killed before the new one took its name)."""
    mo = re.fullmatch(r"checkpoint-(\d+)(\.tmp-old-\d+)?", name)
    return int(mo.group(1)) if mo else None


def find_latest(output_dir: str, cfg_dict: Optional[Dict[str, Any]] = None) -> str:
    """The newest complete checkpoint-N folder of output_dir (verified; incomplete ones are skipped)."""
    if not os.path.isdir(output_dir):
        raise CheckpointError(f"resume: latest: output_dir {output_dir} does not exist")
    cands: List[tuple] = sorted(((s, TMP_MARK not in n, n) for n in os.listdir(output_dir)
                                 if (s := _step_of(n)) is not None), reverse=True)
    problems = []
    for _, _, name in cands:
        p = os.path.join(output_dir, name)
        try:
            verify(p, cfg_dict)
            return p
        except CheckpointError as e:
            problems.append(str(e))
    detail = f" (newest rejected: {problems[0]})" if problems else ""
    raise CheckpointError(f"resume: latest: no complete checkpoint in {output_dir}{detail}")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def check_output_dir(output_dir: str, need_bytes: int) -> None:
    """Before training: the folder can be created and written, and has room for a checkpoint."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".ktmoe-write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"output_dir {output_dir} is not writable ({e.strerror or e}); pick another "
                              "--output-dir before training") from None
    free = shutil.disk_usage(output_dir).free
    if free < need_bytes:
        raise CheckpointError(f"output_dir {output_dir} has {free} bytes free, a checkpoint needs about "
                              f"{need_bytes}; free space or pick another --output-dir before training")
