"""Markdown rendering of a bench result (the dict built by ktmoe.bench.runner.run)."""
from __future__ import annotations

from typing import List, Optional

MiB = 2 ** 20


def _f(v, fmt: str = "{:.1f}", none: str = "–") -> str:
    if v is None:
        return none
    try:
        if v != v:  # NaN
            return none
    except TypeError:
        pass
    return fmt.format(v)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _ms(s: Optional[dict], key: str) -> str:
    if not s:
        return "–"
    if "error" in s:
        return "err"
    return _f(s.get(key))


def render(res: dict) -> str:
    m = res["machine"]
    L: List[str] = ["# ktmoe bench", ""]
    L.append(f"- date: {res['date']}; command: `{res['command']}`")
    L.append(f"- machine: {m['cpu']}, {len(m['allowed_cpus'])} allowed CPUs, NUMA nodes {sorted(m['numa_nodes'])}; "
             f"ISA active **{m['isa_active']}** (detected {m['isa_detected']})")
    L.append(f"- engine: {m['threads']} threads, threadpool_count {m['threadpool_count']}; measured peak "
             f"**{m['peak_gflops']:.0f} GFLOP/s** (bf16 at {m['isa_active']}), read bandwidth "
             f"**{m['read_gbps']:.1f} GB/s** (the higher of the measurements at start, "
             f"{_f(m.get('peak_gflops_start'), '{:.0f}')} GFLOP/s / {_f(m.get('read_gbps_start'))} GB/s, "
             f"and end, {_f(m.get('peak_gflops_end'), '{:.0f}')} GFLOP/s / {_f(m.get('read_gbps_end'))} GB/s)")
    peer_versions = sorted({f"{i.get('version')} ({i.get('cpu_variant')})" for p in res["presets"]
                            for i in p.get("kt_kernel", {}).values() if "version" in i})
    peer = (f"kt-kernel {', '.join(peer_versions) or '(did not start)'} via `{res['peer_python']}`"
            if res.get("peer_python") else "kt-kernel not timed (no --peer-python / $KTMOE_PEER_PYTHON)")
    la0, la1 = res.get("loadavg_start"), res.get("loadavg_end")
    if la0 is not None and la1 is not None:
        busy = max(la0, la1) > 0.5 * len(m["allowed_cpus"]) + 0.5
        L.append(f"- 1-min load average {la0:.1f} at start, {la1:.1f} at end"
                 + (f" on {len(m['allowed_cpus'])} CPUs: **the machine was busy with other work, absolute numbers "
                    f"(peak included) are depressed and noisy; ratios measured side by side are the figures to "
                    f"read**" if busy else ""))
    L.append(f"- ktmoe {res['ktmoe']}, torch {res['torch']} ({res['torch_threads']} threads), "
             f"python {res['python']}; {peer}")
    L.append(f"- LoRA rank {res['rank']}, alpha {res['lora_alpha']:g}; median of {res['repeats']} interleaved "
             f"rounds after {res['warmup']} warm-up; FLOPs per (token, expert) pair: fwd 6HI + 6r(H+I), "
             f"bwd 6HI + 12r(H+I); % BW bound = (2 x touched experts' packed weights / GB/s) / time, shown where "
             f"the step is bandwidth-bound; x vs = their fwd+bwd / ktmoe fwd+bwd (> 1: ktmoe faster)")
    L.append("")

    rows, base_rows, over_rows, mem_rows, notes, stage_rows = [], [], [], [], [], []
    for p in res["presets"]:
        name = p["preset"]["name"]
        if p.get("skipped"):
            notes.append(p["skipped"])
            continue
        for row in p["rows"]:
            o = row["ktmoe"]
            peer_s = row.get("kt_kernel")
            vs_peer = _f(row.get("x_vs_kt_kernel"), "{:.2f}x")
            if peer_s and "error" in peer_s:
                vs_peer = "err"
            elif not peer_s:
                vs_peer = "–"
            vs_torch = _f(row.get("x_vs_torch"), "{:.2f}x")
            if row.get("torch") and "error" in row["torch"]:
                vs_torch = "err"
            rows.append([name, row["method"], str(row["T"]), _ms(o, "fwd_ms"), _ms(o, "bwd_ms"), _ms(o, "total_ms"),
                         _f(row.get("gflops"), "{:.0f}"), _f(row.get("pct_peak"), "{:.0f}%"),
                         _f(row.get("pct_bw_bound"), "{:.0f}%") if row["bw_bound_regime"] else "–",
                         vs_torch, vs_peer])
            t, k = row.get("torch"), peer_s
            base_rows.append([name, row["method"], str(row["T"]), str(row["n_touched"]),
                              _ms(t, "fwd_ms"), _ms(t, "bwd_ms"), _ms(t, "total_ms"),
                              _f((t or {}).get("pct_peak"), "{:.0f}%"),
                              _ms(k, "fwd_ms"), _ms(k, "bwd_ms"), _ms(k, "total_ms"),
                              _f((k or {}).get("pct_peak"), "{:.0f}%"),
                              _f(row["t_bw_bound_ms"]), _f(row["t_flop_bound_ms"])])
            startup_errors = {i.get("error") for i in p.get("kt_kernel", {}).values()}
            for who, s in (("torch", t), ("kt-kernel", k)):
                if s and "error" in s and s["error"] not in startup_errors:
                    notes.append(f"{name} T={row['T']} {who} ({row['method']}): {s['error']}")
        for st in p.get("stages", []):
            stage_rows.append([name, st["method"], str(st["T"]), st["stage"], _f(st["ms"], "{:.2f}"),
                               _f(st.get("gflops"), "{:.0f}"), _f(st.get("pct_peak"), "{:.0f}%"),
                               _f(st.get("weight_gbps")), _f(st.get("pct_bw"), "{:.0f}%")])
        for ov in p["overhead"]:
            over_rows.append([name, ov["method"], str(ov["T"]), _f(ov["fwd_total_us"], "{:.0f}"),
                              f"{_f(ov['fwd_overhead_us'])} ({_f(ov.get('fwd_overhead_min_us'))})",
                              _f(ov["bwd_total_us"], "{:.0f}"),
                              f"{_f(ov['bwd_overhead_us'])} ({_f(ov.get('bwd_overhead_min_us'))})",
                              _f(ov["fwd_overhead_us"] + ov["bwd_overhead_us"])])
        for mm in p["memory"]:
            ratio = mm["resident_after_load"] / mm["held_bytes"] if mm["held_bytes"] else None
            mem_rows.append([name, mm["side"], mm["method"], _f(mm["weights_bytes"] / MiB, "{:.0f}"),
                             _f(mm["held_bytes"] / MiB, "{:.0f}"), _f(mm["resident_after_load"] / MiB, "{:.0f}"),
                             _f(ratio, "{:.2f}"), f"{_f(mm['step_delta'] / MiB, '{:.0f}')} (T={mm['step_T']})"])
        notes.extend(p.get("notes", []))
        for method, info in p.get("kt_kernel", {}).items():
            if "error" in info:
                notes.append(f"{name} kt-kernel {method}: {info['error']}")

    L.append("## Speed (ktmoe)")
    L.append("")
    L += _table(["preset", "method", "T", "fwd ms", "bwd ms", "total ms", "GFLOP/s", "% peak", "% BW bound",
                 "x vs torch", "x vs kt-kernel"], rows)
    L.append("")
    if base_rows:
        L.append("## Baselines, same run")
        L.append("")
        L += _table(["preset", "method", "T", "touched experts", "torch fwd ms", "torch bwd ms", "torch total ms",
                     "torch % peak", "kt-kernel fwd ms", "kt-kernel bwd ms", "kt-kernel total ms",
                     "kt-kernel % peak", "BW bound ms", "FLOP bound ms"], base_rows)
        L.append("")
    if stage_rows:
        L.append("## Where the time goes (native stage profile, one step, mean of 3)")
        L.append("")
        L.append("GEMM stages: GFLOP/s of their base products (fwd_gate_up 4HI, fwd_down 2HI, bwd_down_act 2HI, "
                 "bwd_dx 4HI per pair; LoRA and activation work included in the time) and the rate at which they "
                 "read the touched experts' packed weights, against the peak and read bandwidth of this run")
        L.append("")
        L += _table(["preset", "method", "T", "stage", "ms", "GFLOP/s", "% peak", "weights GB/s", "% BW"],
                    stage_rows)
        L.append("")
    if over_rows:
        L.append("## Python overhead per call (wall time minus time inside the native calls: median (min))")
        L.append("")
        L += _table(["preset", "method", "T", "forward_sft us", "fwd overhead us", "backward us",
                     "bwd overhead us", "fwd+bwd overhead us (median)"], over_rows)
        L.append("")
    if mem_rows:
        L.append("## Memory (VmRSS)")
        L.append("")
        L.append("held = weights + LoRA as the wrapper holds them; resident = VmRSS growth while the wrapper "
                 "loads them (plus the bench's bf16 tensors when the wrapper reads those in place; kt-kernel: "
                 "its process after load, the caller's copy freed, minus before the weights); step = VmRSS "
                 "growth over the first forward+backward.")
        L.append("")
        L += _table(["preset", "side", "method", "weights MiB", "held MiB", "resident MiB", "resident / held",
                     "step MiB"], mem_rows)
        L.append("")
    L += notes_section(notes)
    return "\n".join(L)


def notes_section(notes) -> list:
    """A '## Notes' markdown section listing each distinct note once (empty when there are none)."""
    if not notes:
        return []
    return ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
