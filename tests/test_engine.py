"""The native thread pool on its own: every task runs exactly once, also past the per-round task limit."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = ROOT / "src" / "ktmoe" / "kernels"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_tasks_run_once_in_rounds(tmp_path):
    exe = tmp_path / "rounds"
    subprocess.run(["gcc", "-O2", "-DKT_TASK_BITS=2", f"-I{KERNELS}", str(ROOT / "tests/native/test_engine_rounds.c"),
                    str(KERNELS / "core" / "engine.c"), "-o", str(exe), "-lpthread"], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "mismatches 0" in out.stdout, out.stdout + out.stderr
