"""`python -m ktmoe.bench --expert-parallel`: one layer's forward + backward step with the experts split over 2
ranks (torchrun, gloo, 1 CPU each by the rank-aware engines) next to 1 rank holding all experts on 2 CPUs, on the
same global batch (2 x T tokens), and the bytes the exchanges send per step.

The ranks run `python -m ktmoe.bench.expert_parallel` (this file) under `torch.distributed.run --standalone`; the
single-rank run is the same script without torchrun. Each writes its measurements as JSON; `run` renders them."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List, Optional

import torch

from . import workload as wl


def _step(module, x, ids, w, dy):
    x = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    y = module(x, ids, w)
    t1 = time.perf_counter()
    y.backward(dy)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def worker(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktmoe.bench.expert_parallel")
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(wl.PRESETS))
    p.add_argument("--global-tokens", type=int, required=True, help="tokens per step, split over the ranks")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    from ..engine import cpu_info
    from ..hf.experts import KTMoEHFExperts
    from ..parallel.expert_parallel import exchange_stats, placement

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank = dist.get_rank()
    pr = wl.PRESETS[a.preset]
    gtok = a.global_tokens
    x, ids, w, dy = wl.make_inputs(gtok, pr.E, pr.k, pr.H)
    lo, hi = rank * gtok // world, (rank + 1) * gtok // world
    x, ids, w, dy = x[lo:hi], ids[lo:hi].contiguous(), w[lo:hi].contiguous(), dy[lo:hi]
    gate, up, down = wl.make_weights(pr.E, pr.H, pr.I)
    module = KTMoEHFExperts(gate, up, down, num_experts_per_tok=pr.k, lora_rank=a.rank, lora_alpha=2.0 * a.rank,
                            expert_parallel=placement(pr.E) if world > 1 else None)
    del gate, up, down
    torch.set_num_threads(module.wrapper._engine.threads)
    fwd, bwd = [], []
    for i in range(a.warmup + a.repeats):
        if i == a.warmup:
            exchange_stats(reset=True)
        if world > 1:
            dist.barrier()
        f, b = _step(module, x, ids, w, dy)
        if world > 1:  # the step takes as long as its slowest rank
            t = torch.tensor([f, b], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            f, b = t.tolist()
        if i >= a.warmup:
            fwd.append(f)
            bwd.append(b)
    sent = exchange_stats()
    totals = torch.tensor([sent["bytes"], sent["remote_bytes"], sent["calls"]], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    info = cpu_info()
    out = dict(world=world, threads_per_rank=module.wrapper._engine.threads, preset=pr.as_dict(), global_tokens=gtok,
               rank_cpus=info["rank"]["cpus"],
               fwd_ms=statistics.median(fwd), bwd_ms=statistics.median(bwd),
               step_ms=statistics.median([f + b for f, b in zip(fwd, bwd)]),
               bytes_per_step=float(totals[0]) / a.repeats, remote_bytes_per_step=float(totals[1]) / a.repeats,
               exchanges_per_step=float(totals[2]) / a.repeats / max(world, 1),
               local_experts=module.wrapper.E, cpu=info["cpu"], isa=info["isa_active"])
    if rank == 0:
        with open(a.out, "w") as f:
            json.dump(out, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def run(args) -> dict:
    """The two runs, each in its own processes (so each gets the machine's CPUs afresh)."""
    rows = []
    for preset, T in ((p, t) for p in args.preset for t in args.tokens):
        for ranks in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "ep.json")
                launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                              str(ranks)] if ranks > 1 else [])
                cmd = launch + ["-m", "ktmoe.bench.expert_parallel", "--preset", preset, "--global-tokens",
                                str(2 * T), "--rank", str(args.rank), "--repeats", str(args.repeats),
                                "--warmup", str(args.warmup), "--out", out]
                env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                        "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                                                        "MASTER_PORT", "OMP_NUM_THREADS")}
                if args.isa:  # the level cap reaches the ranks through the environment
                    env["KTMOE_ISA"] = args.isa
                print(f"[ktmoe.bench] expert parallel: {preset}, {2 * T} tokens, {ranks} rank(s)", file=sys.stderr,
                      flush=True)
                subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
                with open(out) as f:
                    rows.append(json.load(f))
    return dict(kind="expert_parallel", command=" ".join(["python", "-m", "ktmoe.bench"] + list(args.argv)),
                rows=rows)


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [f"## Expert parallelism: one layer, forward + backward (`{result['command']}`)", "",
             f"CPU: {rows[0]['cpu']}, ISA {rows[0]['isa']}. Same global batch in both modes; 2 ranks: gloo over "
             "loopback, each rank 1 CPU (rank-aware engines), half of the experts each.", "",
             "| preset | tokens / step | ranks x threads | experts per rank | forward ms | backward ms | step ms | "
             "vs 1 rank | all_to_all calls / step | bytes sent / step, all ranks (to other ranks) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = {}
    for r in rows:
        key = (r["preset"]["name"], r["global_tokens"])
        if r["world"] == 1:
            base[key] = r["step_ms"]
        ratio = base.get(key, float("nan")) / r["step_ms"]
        sent = (f"{r['bytes_per_step'] / 2**20:.2f} MiB ({r['remote_bytes_per_step'] / 2**20:.2f} MiB)"
                if r["world"] > 1 else "-")
        lines.append(f"| {r['preset']['name']} | {r['global_tokens']} | {r['world']} x {r['threads_per_rank']} | "
                     f"{r['local_experts']} (CPUs {r['rank_cpus']}) | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                     f"{r['step_ms']:.1f} | {ratio:.2f}x | {r['exchanges_per_step']:.0f} | {sent} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(worker())
