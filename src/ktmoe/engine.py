"""The process-wide CPU engine (the CPUInfer role): threads, TP subpools, pinning, and the ISA level.

Nobody creates an engine by hand: wrappers ask `get_engine()` for one. The first request sets the thread
count; a later request for a different count gets a warning and shares the running engine. A different
`threadpool_count` needs its own subpool layout, so it gets its own engine (with a warning, as the two
then compete for the same cores)."""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import _core

ISA_ENV = "KTMOE_ISA"            # the ISA level: portable, avx2, avx512, avx512bf16, amx, or amx-model (the tile model)
TOPOLOGY_ENV = "KTMOE_TOPOLOGY"  # subpool CPU lists by hand, e.g. "0-7;8-15"; per local rank: "0-3;4-7|8-11;12-15"
RANK_SPLIT_ENV = "KTMOE_RANK_SPLIT"  # "0": under torchrun every rank keeps the whole allowed set (e.g. the
                                     # launcher already pinned each rank)

_lock = threading.Lock()
_engines: Dict[int, "EngineInfo"] = {}


@dataclass(frozen=True)
class EngineInfo:
    """A running engine and the layout it was built with."""

    core: _core.Engine
    threads: int
    subpool_cpus: Tuple[Tuple[int, ...], ...]
    numa_nodes: Tuple[int, ...]


def _apply_isa_cap() -> str:
    cap = os.environ.get(ISA_ENV, "").strip()
    if cap:
        try:
            return _core.isa_set(cap)
        except ValueError as exc:
            raise ValueError(f"{ISA_ENV}={cap!r}: {exc}") from None
    return _core.isa_set(_core.isa_detected())


_apply_isa_cap()


def set_isa(level: Optional[str]) -> str:
    """Selects the ISA level (None: the best this CPU has, capped by $KTMOE_ISA). Returns the level used.

    A level this machine cannot run falls back along its parents (amx -> avx512bf16 -> avx512 -> avx2 ->
    portable); "amx-model" (the AMX kernels over a C model of the tile unit) runs everywhere."""
    if level is None:
        return _apply_isa_cap()
    if not isinstance(level, str):
        raise TypeError(f"set_isa: level must be a level name or None, got {type(level).__name__}")
    return _core.isa_set(level)


def available_isa_levels() -> List[str]:
    """Levels this machine can run, in registry order (portable first; amx-model, never picked
    automatically, is one of them on every CPU)."""
    return [lv["name"] for lv in _core.isa_levels() if lv["usable"]]


def parse_cpu_list(text: str, what: str = "CPU list") -> List[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]. A malformed list raises ValueError naming `what`."""
    cpus: List[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            if "-" in item:
                lo, hi = item.split("-", 1)
                lo, hi = int(lo), int(hi)
                if lo < 0 or hi < lo:
                    raise ValueError
                cpus.extend(range(lo, hi + 1))
            else:
                c = int(item)
                if c < 0:
                    raise ValueError
                cpus.append(c)
        except ValueError:
            raise ValueError(f"{what} {text!r}: {item!r} is not a CPU number or an ascending range like 0-3 "
                             "(expected e.g. '0-3,8,10-11')") from None
    return cpus


def _check_topology(topology, what: str) -> List[List[int]]:
    """A hand-written subpool layout: a sequence of non-empty sequences of non-negative CPU ints."""
    if isinstance(topology, (str, bytes)) or not hasattr(topology, "__iter__"):
        raise ValueError(f"{what} must be a list of CPU lists, e.g. [[0, 1], [2, 3]], got {topology!r}")
    pools = []
    for i, p in enumerate(topology):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise ValueError(f"{what}[{i}] must be a list of CPU ints, got {p!r}")
        p = list(p)
        for c in p:
            if not isinstance(c, int) or isinstance(c, bool) or c < 0:
                raise ValueError(f"{what}[{i}] holds {c!r}: CPUs must be non-negative ints")
        pools.append(p)
    return pools


def allowed_cpus() -> List[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def numa_nodes() -> Dict[int, List[int]]:
    """NUMA node -> its CPUs (allowed ones only), from sysfs; one node when sysfs has none."""
    allowed = set(allowed_cpus())
    nodes: Dict[int, List[int]] = {}
    base = "/sys/devices/system/node"
    try:
        for name in sorted(os.listdir(base)):
            if name.startswith("node") and name[4:].isdigit():
                with open(os.path.join(base, name, "cpulist")) as f:
                    cpus = [c for c in parse_cpu_list(f.read()) if c in allowed]
                if cpus:
                    nodes[int(name[4:])] = cpus
    except OSError:
        pass
    return nodes or {0: sorted(allowed)}


def _local_rank() -> Optional[Tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) as torchrun sets them, or None outside a multi-process launch."""
    r, n = os.environ.get("LOCAL_RANK"), os.environ.get("LOCAL_WORLD_SIZE")
    if r is None or n is None:
        return None
    try:
        r, n = int(r), int(n)
    except ValueError:
        raise ValueError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r} / LOCAL_WORLD_SIZE="
                         f"{os.environ['LOCAL_WORLD_SIZE']!r} must be ints (as torchrun sets them)") from None
    if n < 1 or not 0 <= r < n:
        raise ValueError(f"LOCAL_RANK={r} must be in [0, LOCAL_WORLD_SIZE={n})")
    return r, n


def rank_cpus() -> Tuple[List[int], str]:
    """This process's share of the allowed CPUs and how it was chosen.

    Under torchrun (LOCAL_RANK / LOCAL_WORLD_SIZE) the local ranks split the allowed set into disjoint
    parts: whole NUMA nodes when there are at least as many nodes as ranks, else contiguous runs of the
    allowed CPUs (sizes differ by at most one). With fewer CPUs than ranks they cannot be disjoint: rank r
    gets CPU r mod n. Outside torchrun, or with KTMOE_RANK_SPLIT=0, the whole allowed set."""
    cpus = allowed_cpus()
    lr = _local_rank()
    if lr is None or lr[1] == 1:
        return cpus, "all"
    if os.environ.get(RANK_SPLIT_ENV, "").strip() == "0":
        return cpus, "all (KTMOE_RANK_SPLIT=0)"
    r, n = lr
    nodes = numa_nodes()
    if len(nodes) >= n > 1:
        ids = sorted(nodes)
        mine = ids[r * len(ids) // n:(r + 1) * len(ids) // n]  # whole nodes, in order
        return sorted(c for i in mine for c in nodes[i]), f"numa nodes {mine} (local rank {r} of {n})"
    if len(cpus) < n:
        return [cpus[r % len(cpus)]], f"shared cpu (local rank {r} of {n}, only {len(cpus)} CPUs allowed)"
    lo, hi = r * len(cpus) // n, (r + 1) * len(cpus) // n
    return cpus[lo:hi], f"contiguous (local rank {r} of {n})"


def _check_allowed(pools: Sequence[Sequence[int]], what: str) -> None:
    """A hand-written layout may only name CPUs this process may run on (pinning elsewhere fails silently)."""
    allowed = set(allowed_cpus())
    outside = sorted({c for p in pools for c in p if c not in allowed})
    if outside:
        raise ValueError(f"{what} names CPUs {outside} outside this process's allowed CPUs "
                         f"{_cpu_list_text(sorted(allowed))} (os.sched_getaffinity(0))")


def _cpu_list_text(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, i = [], 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def plan_subpools(threads: int, parts: int, topology: Optional[Sequence[Sequence[int]]] = None,
                  cpus: Optional[Sequence[int]] = None, what: str = "subpool_cpus"
                  ) -> Tuple[List[List[int]], List[int]]:
    """CPU list of each subpool, and the NUMA node each lives on.

    With a hand-written topology its lists are used as given (every CPU must be allowed). Otherwise the
    CPUs are `cpus` (default: this rank's share, rank_cpus()); subpools follow its NUMA nodes when there
    are at least `parts` of them, else they are contiguous ranges of it."""
    if topology is not None:
        pools = _check_topology(topology, what)
        if len(pools) != parts:
            raise ValueError(f"topology has {len(pools)} subpools but threadpool_count={parts}")
        if any(len(p) == 0 for p in pools):
            raise ValueError("every subpool in the topology needs at least one CPU")
        _check_allowed(pools, what)
        return pools, [-1] * parts
    if threads < parts:
        raise ValueError(f"cpuinfer_threads={threads} is fewer than threadpool_count={parts}: "
                         "each subpool needs at least one thread")
    cpus = list(rank_cpus()[0] if cpus is None else cpus)
    share = set(cpus)
    nodes = {n: [c for c in cs if c in share] for n, cs in numa_nodes().items()}
    nodes = {n: cs for n, cs in nodes.items() if cs}
    per = [threads // parts + (1 if i < threads % parts else 0) for i in range(parts)]
    if len(nodes) >= parts > 1:
        ids = sorted(nodes)[:parts]
        pools = [(nodes[n] * (per[i] // len(nodes[n]) + 1))[: per[i]] for i, n in enumerate(ids)]
        return pools, ids
    cpus = (cpus * (threads // len(cpus) + 1))[:threads]  # more threads than CPUs: wrap around
    pools, at = [], 0
    for n in per:
        pools.append(cpus[at: at + n])
        at += n
    node_of = {c: n for n, cs in nodes.items() for c in cs}
    return pools, [node_of.get(p[0], -1) for p in pools]


def _topology_from_env() -> Optional[List[List[int]]]:
    """$KTMOE_TOPOLOGY: subpools separated by ';'; with '|' one layout per local rank (rank r takes the r-th)."""
    text = os.environ.get(TOPOLOGY_ENV, "").strip()
    if not text:
        return None
    if "|" in text:
        per_rank = text.split("|")
        lr = _local_rank()
        r, n = lr if lr is not None else (0, 1)
        if len(per_rank) != n:
            raise ValueError(f"{TOPOLOGY_ENV}={text!r} has {len(per_rank)} per-rank layouts ('|'-separated) but "
                             f"LOCAL_WORLD_SIZE={n}")
        text = per_rank[r].strip()
    return [parse_cpu_list(part, f"{TOPOLOGY_ENV}={text!r}: subpool") for part in text.split(";") if part.strip()]


def get_engine(threads: Optional[int] = None, parts: int = 1,
               topology: Optional[Sequence[Sequence[int]]] = None) -> EngineInfo:
    """The engine for `parts` subpools, created on first use."""
    if parts < 1 or parts > _core.MAX_PARTS:
        raise ValueError(f"threadpool_count must be in [1, {_core.MAX_PARTS}], got {parts}")
    what = "subpool_cpus"
    if topology is not None:
        topology = _check_topology(topology, what)
    if topology is None:
        topology = _topology_from_env()
        what = TOPOLOGY_ENV
        if topology is not None and len(topology) != parts:
            topology = None  # the env layout describes another split; fall back to automatic
    if topology is not None:  # before the running engine is returned: a bad layout is an error every time
        _check_allowed(topology, what)
    with _lock:
        running = _engines.get(parts)
        if running is not None:
            if threads is not None and threads != running.threads:
                warnings.warn(
                    f"ktmoe: the CPU engine already runs {running.threads} threads; the request for "
                    f"cpuinfer_threads={threads} is ignored (the engine is shared by all layers)",
                    RuntimeWarning, stacklevel=3)
            return running
        share, how = rank_cpus()
        if threads is None:  # the cores this rank may use
            threads = sum(len(p) for p in topology) if topology else len(share)
        if threads < 1:
            raise ValueError(f"cpuinfer_threads must be >= 1, got {threads}")
        if topology is None and threads > len(share) and not how.startswith("all"):
            # warned, not refused: the extra threads stack on this rank's own CPUs, never on another rank's
            warnings.warn(
                f"ktmoe: cpuinfer_threads={threads} exceeds this rank's share of {len(share)} CPUs "
                f"({_cpu_list_text(share)}, {how}); the threads share those CPUs", RuntimeWarning, stacklevel=3)
        pools, nodes = plan_subpools(threads, parts, topology, share, what)
        if _engines:
            warnings.warn(
                f"ktmoe: a second CPU engine is started for threadpool_count={parts} (one with "
                f"threadpool_count={next(iter(_engines))} is running); they share the cores",
                RuntimeWarning, stacklevel=3)
        flat = [c for p in pools for c in p]
        cpu_ids = flat  # thread 0 is the caller: the engine pins it to flat[0] only while a call runs
        core = _core.Engine([len(p) for p in pools], cpu_ids)
        info = EngineInfo(core, len(flat), tuple(tuple(p) for p in pools), tuple(nodes))
        _engines[parts] = info
        return info


def cpu_info() -> dict:
    """What the CPU has, which kernel level is in use, and the engine layouts running."""
    return {
        "cpu": _core.cpu_brand(),
        "features": _core.cpu_features(),
        "isa_detected": _core.isa_detected(),
        "isa_active": _core.isa_active(),
        "isa_cap_env": os.environ.get(ISA_ENV) or None,
        "isa_levels": available_isa_levels(),
        "amx": dict(zip(("detected", "permitted"), _core.amx_status()), active=_core.isa_active() == "amx"),
        "levels": _core.isa_levels(),
        "allowed_cpus": allowed_cpus(),
        "numa_nodes": numa_nodes(),
        "rank": _rank_info(),
        "engines": [
            {"threadpool_count": parts, "threads": e.threads, "subpool_cpus": [list(p) for p in e.subpool_cpus],
             "numa_nodes": list(e.numa_nodes)}
            for parts, e in sorted(_engines.items())
        ],
    }


def _rank_info() -> dict:
    lr = _local_rank()
    cpus, how = rank_cpus()
    return {"local_rank": None if lr is None else lr[0], "local_world_size": None if lr is None else lr[1],
            "cpus": cpus, "split": how}
