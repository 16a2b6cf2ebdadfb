"""Driver that times kt-kernel's SFT experts for `python -m ktmoe.bench`. It is NOT part of ktmoe's API.

It runs under ANOTHER interpreter (the one kt-kernel is installed in, given by --peer-python or
$KTMOE_PEER_PYTHON) as a plain script; it imports torch, kt_kernel and the sibling `workload.py` (by
path) and never ktmoe, so kt-kernel never becomes a ktmoe dependency and the two never share a process.

Protocol: argv[1] is a JSON config {E, k, H, I, rank, alpha, threads, threadpool_count, method, seed,
max_tokens, and optionally data, group_size}. With "data" (a torch.save file holding the bf16 "gate", "up",
"down" and the six bf16 LoRA tensors by name), those exact tensors are loaded instead of the seeded ones
(the accuracy comparison: both libraries see the same bits).
kt-kernel's C++ code prints to stdout, so every reply is one line that starts with MARK
followed by JSON. After setup it replies {"ready": true, ...memory...} or {"error": "..."}; then it reads
one JSON command per stdin line:
    {"cmd": "step", "T": 16, "n": 1}  -> {"fwd_ms": [...], "bwd_ms": [...]}   (n forward+backward steps)
    {"cmd": "rss"}                     -> {"rss": bytes}
    {"cmd": "accuracy", "inputs": path, "out": path}
        -> {"ok": true, ...}: one forward(save_for_backward=True) + backward on the torch.save'd inputs
           {"x" bf16 [T,H], "ids" int64 [T,k], "w" fp32 [T,k], "dy" bf16 [T,H]}; torch.save's to "out"
           {"y", "grad_input", "grad_weights", and the six LoRA grads by name} as kt-kernel returned them
    {"cmd": "quit"}                    -> exits
Errors inside a command are replied as {"error": "..."}; the driver keeps serving.

kt-kernel calls used (0.7.2): kt_kernel.KTMoEWrapper(mode="sft", method=..., gpu_experts_mask=None,
weight_path=None, ...); load_weights_from_tensors(gate, up, down, physical_to_logical_map);
init_lora_weights(6 bf16 LoRA tensors, 6 bf16 grad buffers); forward(x, ids, w, save_for_backward=True)
(kt-kernel's SFT wrapper has no forward_sft); backward(grad_output) -> (grad_input, grad_weights), the
LoRA grads landing in the buffers given to init_lora_weights."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import sys
import time
import traceback

MARK = "@@KTMOE-PEER@@ "


def _to_fp8_blocks(w):
    """[R, C] float -> (e4m3 codes, fp32 scale_inv [R/128, C/128]): scale = amax / 448 per 128 x 128 block, the
    quantization ktmoe's fp8 format uses when it packs from float (sizes must be multiples of 128 here)."""
    import torch

    R, C = w.shape
    if R % 128 or C % 128:
        raise ValueError(f"kt-kernel AMXFP8_SFT needs sizes that are multiples of 128, got {R} x {C}")
    blocks = w.float().reshape(R // 128, 128, C // 128, 128)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (blocks / scale[:, None, :, None]).reshape(R, C).to(torch.float8_e4m3fn).contiguous()
    return q, scale.contiguous()


def reply(obj) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _die_with_parent() -> None:
    """If the bench dies (even while it holds this process SIGSTOPped), take this process down too."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


def main() -> int:
    _die_with_parent()
    cfg = json.loads(sys.argv[1])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import torch
        import workload as wl  # the sibling file, by path: same data as the in-process side

        torch.set_num_threads(max(1, int(cfg["threads"])))
        E, k, H, I, r = (int(cfg[n]) for n in ("E", "k", "H", "I", "rank"))
        rss0 = wl.rss_bytes()
        import kt_kernel
        from kt_kernel import KTMoEWrapper

        rss_import = wl.rss_bytes()
        data = torch.load(cfg["data"], weights_only=True) if cfg.get("data") else None
        extra = {"group_size": int(cfg["group_size"])} if cfg.get("group_size") else {}
        w = KTMoEWrapper(layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H,
                         moe_intermediate_size=I, gpu_experts_mask=None, cpuinfer_threads=int(cfg["threads"]),
                         threadpool_count=int(cfg["threadpool_count"]), weight_path=None,
                         chunked_prefill_size=int(cfg["max_tokens"]), method=cfg["method"], mode="sft",
                         lora_rank=r, lora_alpha=float(cfg["alpha"]), **extra)
        rss_before = wl.rss_bytes()
        if data is not None:
            gate, up, down = (data.pop(n).contiguous() for n in ("gate", "up", "down"))
        else:
            gate, up, down = wl.make_weights(E, H, I, seed=int(cfg["seed"]))
        if cfg["method"] == "AMXFP8_SFT":  # it takes only per-expert e4m3 + 128 x 128 block scales
            from kt_kernel.sft.weights import BlockFP8ExpertWeights

            w.share_backward_bb = True  # its FP8 SFT builds the backward weights from one shared buffer pool

            fp8 = {n: [_to_fp8_blocks(t[e]) for e in range(E)] for n, t in (("gate", gate), ("up", up),
                                                                          ("down", down))}
            w.load_block_fp8_weights(BlockFP8ExpertWeights(
                gate_proj=[q for q, _ in fp8["gate"]], gate_scale=[s for _, s in fp8["gate"]],
                up_proj=[q for q, _ in fp8["up"]], up_scale=[s for _, s in fp8["up"]],
                down_proj=[q for q, _ in fp8["down"]], down_scale=[s for _, s in fp8["down"]]),
                torch.arange(E, dtype=torch.int64))
            del fp8
        else:
            w.load_weights_from_tensors(gate, up, down, torch.arange(E, dtype=torch.int64))
        del gate, up, down  # the caller's copy goes; what stays resident is kt-kernel's own
        gc.collect()
        if data is not None:
            lora = {n: data[n].to(torch.bfloat16).contiguous() for n in wl.LORA_ORDER}
        else:
            lora = wl.make_lora(E, H, I, r, torch.bfloat16, seed=int(cfg["seed"]) + 1)
        grads = {n: torch.zeros_like(t) for n, t in lora.items()}
        w.init_lora_weights(*(lora[n] for n in wl.LORA_ORDER), *(grads[n] for n in wl.LORA_ORDER))
        rss_load = wl.rss_bytes()
        inputs = {}

        def get_inputs(T):
            if T not in inputs:
                inputs[T] = wl.make_inputs(T, E, k, H, seed=int(cfg["seed"]) + 2)
            return inputs[T]

        def step(T):
            x, ids, wts, dy = get_inputs(T)
            t0 = time.perf_counter()
            w.forward(x, ids, wts, save_for_backward=True)
            t1 = time.perf_counter()
            w.backward(dy)
            t2 = time.perf_counter()
            return (t1 - t0) * 1e3, (t2 - t1) * 1e3

        def accuracy(inputs_path, out_path):
            d = torch.load(inputs_path, weights_only=True)
            for g in grads.values():  # the buffers may accumulate: start from zero
                g.zero_()
            y = w.forward(d["x"].contiguous(), d["ids"].contiguous(), d["w"].contiguous(), save_for_backward=True)
            gi, gw = w.backward(d["dy"].contiguous())
            out = dict(y=y.detach().clone(), grad_input=gi.detach().clone(), grad_weights=gw.detach().clone())
            out.update({n: g.detach().clone() for n, g in grads.items()})
            torch.save(out, out_path)
            return {n: str(t.dtype) for n, t in out.items()}

        step(int(cfg["max_tokens"]))  # the same step size as the in-process memory probe
        rss_step = wl.rss_bytes()
        reply(dict(ready=True, version=getattr(kt_kernel, "__version__", "?"),
                   cpu_variant=str(getattr(kt_kernel, "__cpu_variant__", "?")),
                   torch=torch.__version__, rss_start=rss0, rss_import=rss_import, rss_before_weights=rss_before,
                   rss_after_load=rss_load, rss_after_step=rss_step, step_T=int(cfg["max_tokens"]),
                   weights_bytes=wl.weight_bytes_bf16(E, H, I), lora_bytes=wl.lora_numel(E, H, I, r) * 2))
    except Exception as exc:  # setup failed: say why and stop
        reply(dict(error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=4)))
        return 1

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                break
            if cmd["cmd"] == "rss":
                reply(dict(rss=wl.rss_bytes()))
            elif cmd["cmd"] == "accuracy":
                reply(dict(ok=True, dtypes=accuracy(cmd["inputs"], cmd["out"])))
            elif cmd["cmd"] == "step":
                fwd, bwd = [], []
                for _ in range(int(cmd.get("n", 1))):
                    f, b = step(int(cmd["T"]))
                    fwd.append(f)
                    bwd.append(b)
                reply(dict(fwd_ms=fwd, bwd_ms=bwd))
            else:
                reply(dict(error=f"unknown command {cmd['cmd']!r}"))
        except Exception as exc:
            reply(dict(error=f"{type(exc).__name__}: {exc}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
