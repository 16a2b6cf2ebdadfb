"""`python -m ktmoe.bench --accuracy`: how close ktmoe's forward and every gradient are to exact math, per SFT
method, side by side with kt-kernel on the very same inputs (measured in the same run).

One seeded input set per (preset, T): bf16 frozen weights (workload.make_weights), bf16 LoRA
(workload.make_lora, B non-zero), bf16 hidden states and grad_output, int64 expert ids (k distinct per
token), fp32 routing weights; lora_alpha = 32. Both libraries get exactly these bits: the kt-kernel driver
loads them from a torch.save file instead of regenerating them.

Reference: ktmoe.moe_reference in fp32 (autograd gives every gradient), fed the bf16 values in fp32:
  - "vs original": on the ORIGINAL bf16 weights. For quantized methods this includes the weight
    quantization error; the issue's bar is "at least as accurate as kt-kernel where it has the method".
  - "vs dequantized" (ktmoe only): on wrapper.dequantized_weights(), the weights the kernels effectively
    use; this isolates the kernels' own arithmetic and must be within DEQUANT_TOL.

Error measure: relative L2 over a whole tensor, ||got - ref|| / ||ref||, for y, grad_input, the routing-
weight grad ("weights") and the six LoRA grads. kt-kernel returns bf16 y / grad_input / LoRA grads and an fp32
routing-weight grad; ktmoe returns bf16 y / grad_input and fp32 LoRA and routing-weight grads."""
from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from typing import Dict, List, Optional

import torch

from .._version import __version__ as ktmoe_version
from ..engine import cpu_info, get_engine, set_isa
from ..experts import KTMoEWrapper
from ..lora import LORA_NAMES
from ..methods import REGISTRY, SFT_METHODS
from ..reference import moe_reference
from . import workload as wl
from .peer import Peer, PeerError
from .report import notes_section

LORA_ALPHA = 32.0
SEED = 1234
DEFAULT_PRESET = "small"
DEFAULT_TOKENS = [64]
DEFAULT_RANK = 8
# Kernel vs the fp32 reference on the dequantized weights: the bound tests/tolerances.py (REL_L2) holds every
# format to in tests/test_numerics.py (bf16 activations and intermediates, fp32 accumulation).
DEQUANT_TOL = 1e-2
TENSORS = ("y", "grad_input", "weights") + LORA_NAMES
# the methods in a readable order (registry order), for the default "all SFT methods"
METHOD_ORDER = [m for m in REGISTRY if m in SFT_METHODS]


def log(msg: str) -> None:
    print(f"[ktmoe.bench] {msg}", file=sys.stderr, flush=True)


def rel_l2(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    den = ref.norm().item()
    num = (got - ref).norm().item()
    return num / den if den > 0 else num


def group_size_for(method: str, H: int, I: int) -> Optional[int]:
    """The K-group size used for per-group formats: the largest of 128, 64, ... that divides H and I."""
    if not getattr(REGISTRY[method].weight_format, "per_group", False):
        return None
    for gs in (128, 64, 32, 16, 8, 4, 2):
        if H % gs == 0 and I % gs == 0:
            return gs
    raise ValueError(f"{method}: no group size in 2..128 divides H={H} and I={I}")


def reference_grads(inputs, gate, up, down, lora_bf16: Dict[str, torch.Tensor], scaling: float) -> Dict[str, torch.Tensor]:
    """fp32 reference: y and every gradient (grad_input, weights, the six LoRA grads) by autograd."""
    x, ids, w, dy = inputs
    # fresh leaves: .float() of an fp32 tensor is the tensor itself, and its .grad would carry over
    xr = x.detach().float().clone().requires_grad_(True)
    wr = w.detach().float().clone().requires_grad_(True)
    lr = {n: lora_bf16[n].detach().float().clone().requires_grad_(True) for n in LORA_NAMES}
    y = moe_reference(xr, ids, wr, gate.float(), up.float(), down.float(), lora=lr, scaling=scaling)
    (y * dy.float()).sum().backward()
    out = dict(y=y.detach(), grad_input=xr.grad, weights=wr.grad)
    out.update({n: lr[n].grad for n in LORA_NAMES})
    return out


def ktmoe_outputs(w: KTMoEWrapper, inputs) -> Dict[str, torch.Tensor]:
    x, ids, wts, dy = inputs
    y = w.forward_sft(x, ids, wts, save_for_backward=True)
    dx, grads = w.backward(dy)
    out = dict(y=y.detach().clone(), grad_input=dx.detach().clone(), weights=grads["weights"].detach().clone())
    out.update({n: grads[n].detach().clone() for n in LORA_NAMES})
    return out


def _errors(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {n: rel_l2(got[n], ref[n]) for n in TENSORS if n in got}


def run_preset(preset: wl.Preset, args, tmp: str) -> dict:
    E, k, H, I, r = preset.E, preset.k, preset.H, preset.I, args.rank
    scaling = LORA_ALPHA / r
    res: dict = dict(preset=preset.as_dict(), rank=r, tokens=list(args.tokens), methods=[], kt_kernel={})
    log(f"accuracy {preset.name}: E={E} k={k} H={H} I={I} r={r}, T={args.tokens}")
    gate, up, down = wl.make_weights(E, H, I, seed=SEED)
    lora = wl.make_lora(E, H, I, r, torch.bfloat16, seed=SEED + 1)
    inputs = {T: wl.make_inputs(T, E, k, H, seed=SEED + 2) for T in args.tokens}
    data_path = os.path.join(tmp, f"{preset.name}-data.pt")
    in_paths = {}
    if args.peer_python:
        torch.save(dict(gate=gate, up=up, down=down, **lora), data_path)
        for T, (x, ids, wts, dy) in inputs.items():
            in_paths[T] = os.path.join(tmp, f"{preset.name}-T{T}-inputs.pt")
            torch.save(dict(x=x, ids=ids, w=wts, dy=dy), in_paths[T])
    ref_orig = {T: reference_grads(inp, gate, up, down, lora, scaling) for T, inp in inputs.items()}

    for method in args.method:
        gs = group_size_for(method, H, I)
        entry: dict = dict(method=method, group_size=gs, per_T=[])
        # ktmoe
        extra = {} if gs is None else dict(group_size=gs)
        try:
            w = KTMoEWrapper(mode="sft", method=method, layer_idx=0, num_experts=E, num_experts_per_tok=k,
                             hidden_size=H, moe_intermediate_size=I, cpuinfer_threads=args.threads,
                             threadpool_count=args.threadpool_count, chunked_prefill_size=max(4096, max(args.tokens)),
                             lora_rank=r, lora_alpha=LORA_ALPHA, **extra)
            w.load_weights_from_tensors(gate, up, down)
            lora32 = {n: lora[n].float().contiguous() for n in LORA_NAMES}  # the same (bf16) values
            w.init_lora_weights(*(lora32[n] for n in LORA_NAMES))
            deq = w.dequantized_weights()
        except Exception as exc:
            entry["ktmoe_error"] = f"{type(exc).__name__}: {exc}"
            log(f"ktmoe {method} failed: {entry['ktmoe_error']}")
            w = None
        # kt-kernel: one driver process per method, on the same bits
        peer: Optional[Peer] = None
        if args.peer_python:
            cfg = dict(E=E, k=k, H=H, I=I, rank=r, alpha=LORA_ALPHA, threads=args.threads,
                       threadpool_count=args.threadpool_count, method=method, seed=SEED,
                       max_tokens=max(args.tokens), data=data_path)
            if gs is not None:
                cfg["group_size"] = gs
            log(f"starting kt-kernel ({method}) via {args.peer_python}")
            try:
                peer = Peer(args.peer_python, cfg)
                res["kt_kernel"][method] = {kk: v for kk, v in peer.info.items() if kk in ("version", "cpu_variant", "torch")}
            except (PeerError, OSError) as exc:
                msg = f"{type(exc).__name__}: {exc}".split(". Supported:")[0]  # kt-kernel lists every method
                log(f"kt-kernel {method} did not start: {msg}")
                res["kt_kernel"][method] = dict(error=msg)
        try:
            for T, inp in inputs.items():
                row: dict = dict(T=T)
                if w is not None:
                    try:
                        got = ktmoe_outputs(w, inp)
                        row["ktmoe_vs_original"] = _errors(got, ref_orig[T])
                        ref_deq = reference_grads(inp, *deq, lora, scaling)
                        row["ktmoe_vs_dequantized"] = _errors(got, ref_deq)
                    except Exception as exc:
                        row["ktmoe_error"] = f"{type(exc).__name__}: {exc}"
                        log(f"ktmoe {method} T={T} failed: {row['ktmoe_error']}")
                if peer is not None:
                    out_path = os.path.join(tmp, f"{preset.name}-{method}-T{T}-kt.pt")
                    try:
                        peer.accuracy(in_paths[T], out_path)
                        kt = torch.load(out_path, weights_only=True)
                        kt["weights"] = kt.pop("grad_weights")
                        row["kt_kernel_vs_original"] = _errors(kt, ref_orig[T])
                        row["kt_kernel_dtypes"] = {n: str(t.dtype).replace("torch.", "") for n, t in kt.items()}
                    except (PeerError, OSError, RuntimeError, KeyError, ValueError) as exc:
                        row["kt_kernel_error"] = f"{type(exc).__name__}: {exc}"
                        log(f"kt-kernel {method} T={T} failed: {row['kt_kernel_error']}")
                o, p = row.get("ktmoe_vs_original", {}), row.get("kt_kernel_vs_original", {})
                worst = max(row.get("ktmoe_vs_dequantized", {}).values(), default=float("nan"))
                msg = f"{preset.name} {method} T={T}: ktmoe y {o.get('y', float('nan')):.2e}"
                if p:
                    msg += f", kt-kernel y {p.get('y', float('nan')):.2e}"
                log(msg + f"; ktmoe vs dequantized worst {worst:.2e}")
                entry["per_T"].append(row)
        finally:
            if peer is not None:
                peer.close()
            del w
        res["methods"].append(entry)
    return res


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    isa = set_isa(args.isa) if args.isa else set_isa(None)
    eng = get_engine(args.threads, args.threadpool_count)
    info = cpu_info()
    result = dict(mode="accuracy",
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  command=" ".join([os.path.basename(sys.executable), "-m", "ktmoe.bench"] + list(args.argv)),
                  python=platform.python_version(), torch=torch.__version__, ktmoe=ktmoe_version,
                  machine=dict(cpu=info["cpu"], isa_active=isa, isa_detected=info["isa_detected"],
                               threads=eng.threads, threadpool_count=args.threadpool_count),
                  rank=args.rank, lora_alpha=LORA_ALPHA, seed=SEED, dequant_tol=DEQUANT_TOL,
                  peer_python=args.peer_python, presets=[])
    with tempfile.TemporaryDirectory(prefix="ktmoe-accuracy-") as tmp:
        for name in args.preset:
            result["presets"].append(run_preset(wl.PRESETS[name], args, tmp))
    return result


# ---------------------------------------------------------------- markdown
def _e(v: Optional[float]) -> str:
    if v is None or v != v:
        return "–"
    return f"{v:.2e}"


def render(res: dict) -> str:
    m = res["machine"]
    versions = sorted({f"{i['version']} ({i.get('cpu_variant')})" for p in res["presets"]
                       for i in p.get("kt_kernel", {}).values() if "version" in i})
    peer = (f"kt-kernel {', '.join(versions) or '(did not start)'} via `{res['peer_python']}`"
            if res.get("peer_python") else "kt-kernel not run (no --peer-python / $KTMOE_PEER_PYTHON)")
    tol = res["dequant_tol"]
    L: List[str] = ["# ktmoe accuracy", ""]
    L.append(f"- date: {res['date']}; command: `{res['command']}`")
    L.append(f"- machine: {m['cpu']}; ISA active **{m['isa_active']}** (detected {m['isa_detected']}); "
             f"{m['threads']} threads")
    L.append(f"- ktmoe {res['ktmoe']}, torch {res['torch']}, python {res['python']}; {peer}")
    L.append(f"- LoRA rank {res['rank']}, alpha {res['lora_alpha']:g}, seed {res['seed']}; both libraries get the "
             f"same bf16 weights, bf16 LoRA (B non-zero), bf16 x and dy, int64 ids and fp32 routing weights")
    kt_dtypes = next((r["kt_kernel_dtypes"] for p in res["presets"] for e in p["methods"] for r in e["per_T"]
                      if "kt_kernel_dtypes" in r), None)
    if kt_dtypes:
        L.append(f"- returned dtypes: ktmoe y/grad_input bf16, LoRA and routing-weight grads fp32; kt-kernel "
                 + ", ".join(f"{n} {d}" for n, d in kt_dtypes.items()))
    L.append("- error = relative L2 ||got - ref|| / ||ref|| over the whole tensor; ref = `ktmoe.moe_reference` in "
             "fp32 with autograd. **vs original**: ref on the original bf16 weights (includes the quantization "
             "error). **vs dequantized**: ref on `wrapper.dequantized_weights()` (the kernels' own error), "
             f"tolerance **{tol:g}**. *ktmoe / kt-kernel* < 1: ktmoe more accurate.")
    L.append("")
    notes: List[str] = []
    for p in res["presets"]:
        pr = p["preset"]
        for T in p["tokens"]:
            L.append(f"## {pr['name']}: E={pr['E']} k={pr['k']} H={pr['H']} I={pr['I']} r={p['rank']}, T={T}")
            L.append("")
            L.append("| method | tensor | ktmoe vs original | kt-kernel vs original | ktmoe / kt-kernel | "
                     f"ktmoe vs dequantized | ≤ {tol:g} |")
            L.append("|---|---|---:|---:|---:|---:|---:|")
            summary: List[str] = []
            for e in p["methods"]:
                method = e["method"]
                label = method + (f" (g={e['group_size']})" if e.get("group_size") else "")
                if e.get("ktmoe_error"):
                    notes.append(f"{pr['name']} ktmoe {method}: {e['ktmoe_error']}")
                kt_err = p.get("kt_kernel", {}).get(method, {}).get("error")
                row = next((r for r in e["per_T"] if r["T"] == T), {})
                o = row.get("ktmoe_vs_original", {})
                q = row.get("kt_kernel_vs_original", {})
                d = row.get("ktmoe_vs_dequantized", {})
                ratios, fails = [], []
                for i, n in enumerate(TENSORS):
                    ratio = None
                    if n in o and n in q and q[n] > 0:
                        ratio = o[n] / q[n]
                        ratios.append((ratio, n))
                    ok = "–" if n not in d else ("ok" if d[n] <= tol else "**FAIL**")
                    if n in d and d[n] > tol:
                        fails.append(n)
                    kt_cell = _e(q.get(n)) if q else "n/a"
                    shown = "weights (routing grad)" if n == "weights" else n
                    L.append("| " + " | ".join([label if i == 0 else "", shown, _e(o.get(n)), kt_cell,
                                                "–" if ratio is None else f"{ratio:.2f}", _e(d.get(n)), ok]) + " |")
                parts = []
                if d:
                    parts.append(f"kernel vs dequantized worst {_e(max(d.values()))}"
                                 + (f" (≤ {tol:g})" if not fails else f" (**over {tol:g}: {', '.join(fails)}**)"))
                if ratios:
                    worse = [f"{n} {rt:.2f}x" for rt, n in ratios if rt > 1.0]
                    parts.append("vs original at least as accurate as kt-kernel on all "
                                 f"{len(ratios)} tensors (worst ratio {max(ratios)[0]:.2f})" if not worse else
                                 f"vs original LESS accurate than kt-kernel on: {', '.join(worse)}")
                elif row.get("kt_kernel_error"):
                    parts.append(f"kt-kernel failed: {row['kt_kernel_error']}")
                elif kt_err:
                    parts.append(f"kt-kernel does not run it from tensors: {kt_err}")
                elif not res.get("peer_python"):
                    parts.append("kt-kernel not run")
                if row.get("ktmoe_error"):
                    parts.append(f"ktmoe failed: {row['ktmoe_error']}")
                summary.append(f"**{method}**: " + "; ".join(parts))
            L.append("")
            L += [f"- {s_}" for s_ in summary]
            L.append("")
    L += notes_section(notes)
    return "\n".join(L)
