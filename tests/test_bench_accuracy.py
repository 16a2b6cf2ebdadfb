"""`python -m ktmoe.bench --accuracy` on the tiny preset, without the peer (kt-kernel is not part of CI): the
table appears with every SFT method and tensor, and the kernel-vs-dequantized column is within its bound."""
import json
import os
import subprocess
import sys

import ktmoe

TENSORS = ("y", "grad_input", "weights") + tuple(ktmoe.LORA_NAMES)


def test_bench_accuracy_tiny(tmp_path):
    md, js = tmp_path / "acc.md", tmp_path / "acc.json"
    env = dict(os.environ)
    env.pop("KTMOE_PEER_PYTHON", None)
    proc = subprocess.run([sys.executable, "-m", "ktmoe.bench", "--accuracy", "--preset", "tiny", "--threads", "2",
                           "--markdown", str(md), "--json", str(js)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| method | tensor | ktmoe vs original | kt-kernel vs original | ktmoe / kt-kernel | ktmoe vs dequantized |" in out
    assert "## tiny: E=8 k=2 H=256 I=128" in out
    assert "kt-kernel not run" in out
    assert "FAIL" not in out, out
    for method in ktmoe.SFT_METHODS:
        assert any(line.startswith(f"| {method} ") for line in out.splitlines()), (method, out)
    assert md.read_text().strip() == out.strip()

    res = json.loads(js.read_text())
    assert res["mode"] == "accuracy"
    (preset,) = res["presets"]
    assert {e["method"] for e in preset["methods"]} == set(ktmoe.SFT_METHODS)
    for e in preset["methods"]:
        (row,) = e["per_T"]
        assert "ktmoe_error" not in e and "ktmoe_error" not in row, e
        assert set(row["ktmoe_vs_original"]) == set(TENSORS)
        for name, err in row["ktmoe_vs_dequantized"].items():
            assert 0 < err <= res["dequant_tol"], (e["method"], name, err)
        if e["method"] == "AMXBF16_SFT":  # no quantization: original == dequantized
            assert row["ktmoe_vs_original"] == row["ktmoe_vs_dequantized"]
        assert "kt_kernel_vs_original" not in row
