"""A compiler that lacks a level's flags drops that level and still builds all the others: the native
module is built here from this checkout with a compiler wrapper that refuses every -mamx-* flag (as a gcc
older than 11 would), then imported on its own to read its level registry."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_tools = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("gcc") is None or
    subprocess.run([sys.executable, "-c", "import Cython"], capture_output=True).returncode != 0,
    reason="needs cmake, gcc and Cython (the test extra installs them)")


@needs_tools
def test_build_without_amx_flags_keeps_other_levels(tmp_path):
    cc = tmp_path / "cc-without-amx"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do case "$a" in -mamx*) echo "cc: unknown flag $a" >&2; exit 1;; esac; '
                  'done\nexec gcc "$@"\n')
    cc.chmod(0o755)
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release",
                          f"-DCMAKE_C_COMPILER={cc}", f"-DPython_EXECUTABLE={sys.executable}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    assert "level amx dropped" in cfg.stdout, cfg.stdout[-3000:]
    out = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    probe = ("import sys, json; sys.path.insert(0, sys.argv[1]); import _core; "
             "print(json.dumps([_core.isa_levels(), _core.isa_active()]))")
    run = subprocess.run([sys.executable, "-c", probe, str(build)], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "KTMOE_ISA"})
    assert run.returncode == 0, run.stderr
    levels, active = json.loads(run.stdout)
    built = {lv["name"]: lv["built"] for lv in levels}
    assert built == {"portable": True, "avx2": True, "avx512": True, "avx512bf16": True, "amx-model": True,
                     "amx": False}, built
    amx = next(lv for lv in levels if lv["name"] == "amx")
    assert not amx["usable"] and "not built" in amx["why_not"]
    model = next(lv for lv in levels if lv["name"] == "amx-model")
    assert model["usable"], model
    assert active != "amx"
