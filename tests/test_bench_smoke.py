"""CI smoke run of `python -m ktmoe.bench --smoke` (tiny shape, one round). Timings are not checked: benchmarks
never run as timed tests; this only proves the bench runs end to end and prints its table."""
import json
import os
import subprocess
import sys


def test_bench_smoke(tmp_path):
    md, js = tmp_path / "bench.md", tmp_path / "bench.json"
    env = dict(os.environ)
    env.pop("KTMOE_PEER_PYTHON", None)  # the peer (kt-kernel) is not part of CI
    proc = subprocess.run([sys.executable, "-m", "ktmoe.bench", "--smoke", "--markdown", str(md), "--json", str(js)],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| preset | method | T | fwd ms | bwd ms | total ms | GFLOP/s | % peak | % BW bound | x vs torch |" in out
    row = [line for line in out.splitlines() if line.startswith("| tiny | AMXBF16_SFT | 16 |")]
    assert row, out
    assert "err" not in row[0], row[0]
    assert md.read_text().strip() == out.strip()
    res = json.loads(js.read_text())
    r = res["presets"][0]["rows"][0]
    assert r["ktmoe"]["total_ms"] > 0 and r["gflops"] > 0 and r["x_vs_torch"] > 0
    assert res["machine"]["peak_gflops"] > 0 and res["machine"]["read_gbps"] > 0
    assert {o["T"] for o in res["presets"][0]["overhead"]} == {1, 16}


def test_bench_help_lists_presets():
    proc = subprocess.run([sys.executable, "-m", "ktmoe.bench", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("qwen3-30b-a3b", "deepseek-v2-lite", "mixtral-8x7b", "deepseek-v3", "tiny"):
        assert name in proc.stdout


def test_bench_expert_parallel_smoke(tmp_path):
    """`--expert-parallel --smoke`: the 1-rank and the 2-rank (torchrun, gloo) runs, their table and exchange bytes."""
    js = tmp_path / "ep.json"
    proc = subprocess.run([sys.executable, "-m", "ktmoe.bench", "--expert-parallel", "--smoke", "--json", str(js)],
                          capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [line.split("|")[3].split("x")[0].strip() for line in proc.stdout.splitlines()
             if line.startswith("| tiny | 32 |")]
    assert ranks == ["1", "2"], proc.stdout  # (threads per rank: the machine's CPUs, split over the ranks)
    one, two = json.loads(js.read_text())["rows"]
    assert (one["world"], one["local_experts"], one["bytes_per_step"]) == (1, 8, 0)
    assert (two["world"], two["local_experts"], two["exchanges_per_step"]) == (2, 4, 8)
    assert 0 < two["remote_bytes_per_step"] < two["bytes_per_step"]
