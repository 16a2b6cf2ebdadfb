"""Issue #14: atomic, verifiable training checkpoints.

kill -9 at write points of a save (KTMOE_CKPT_FAULT): `--resume latest` either continues bit-exactly
from the newest complete checkpoint or refuses with one line; a checkpoint mixing two runs' files, one
without its manifest, or one of another configuration is refused; disk full and an unwritable output
folder are reported as such, before training for the folder, with earlier checkpoints intact."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ktmoe

pytest.importorskip("peft")
pytest.importorskip("transformers")

from conftest import THREADS  # noqa: E402
from ktmoe.train import checkpoint as C  # noqa: E402
from ktmoe.train import trainer as T  # noqa: E402
from ktmoe.train.config import make_config  # noqa: E402
from ktmoe.train.trainer import train  # noqa: E402

# the ktmoe this test process imported (the installed package, or a source tree on PYTHONPATH)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(ktmoe.__file__)))
BASE = {"steps": 4, "cpuinfer_threads": THREADS, "save_every": 2, "compare": False, "progress": False,
        "batch_size": 2, "max_seq_len": 64}
FLAGS = ["--steps", "4", "--cpuinfer-threads", str(THREADS), "--save-every", "2", "--no-compare", "--no-progress",
         "--batch-size", "2", "--max-seq-len", "64"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(make_config({**BASE, "output_dir": str(out)}))


def _cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=SRC, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "ktmoe.train", *FLAGS, *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_checkpoint_has_a_manifest(full):
    out, res = full
    m = C.verify(str(out / "checkpoint-2"), res.config.to_dict())
    assert m["step"] == 2 and m["seed"] == 0 and set(m["files"]) >= {T.STATE_FILE, "adapter_config.json"}
    assert not [n for n in os.listdir(out) if C.TMP_MARK in n]


# (write point, which save, into a folder holding an earlier complete run): 1 after the files, 2 after hashing,
# 3 after the manifest, 4 old checkpoint moved aside (only when one exists), 5 after the rename; save 1 is
# checkpoint-2, save 2 checkpoint-4 (the last)
@pytest.mark.parametrize("point,save,rerun", [(3, 1, False), (5, 1, False), (2, 2, False), (4, 1, True)])
def test_kill_9_while_saving_then_resume_latest(full, tmp_path, point, save, rerun):
    src, ref = full
    out = tmp_path / "run"
    if rerun:
        shutil.copytree(src, out)
    p = _cli(["--output-dir", str(out)], {C.FAULT_ENV: f"{point}:{save}"})
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    complete = [n for n in os.listdir(out) if n.startswith("checkpoint-") and C.TMP_MARK not in n]
    for n in complete:  # whatever carries the final name is complete
        C.verify(str(out / n))
    cfg = make_config({**BASE, "output_dir": str(out), "resume": "latest"})
    try:
        res = train(cfg)
    except C.CheckpointError as e:
        if "no complete checkpoint" in str(e):
            assert not complete and not (point == 5 or save == 2), "a complete checkpoint existed"
        else:  # the newest complete one is the last step: nothing to continue
            assert "the checkpoint is at step 4" in str(e) and "checkpoint-4" in complete, e
        q = _cli(["--output-dir", str(out), "--resume", "latest"])  # the command line: one line, no traceback
        assert q.returncode == 2 and "Traceback" not in q.stderr, q.stderr
        lines = [ln for ln in q.stderr.splitlines() if ln.strip() and "Warning" not in ln
                 and not ln.startswith("  warnings.warn")]  # library deprecation warnings aside
        assert len(lines) == 1 and lines[0].startswith("ktmoe.train: error: resume:"), q.stderr
        return
    assert res.start_step == 2
    assert res.losses == ref.losses  # bit-exact continuation


def test_mixed_foreign_and_mismatched_checkpoints_refused(full, tmp_path):
    out, res = full
    other = tmp_path / "other"
    train(make_config({**BASE, "output_dir": str(other), "seed": 1}))
    mixed = tmp_path / "mixed"
    shutil.copytree(out / "checkpoint-2", mixed)
    shutil.copy(other / "checkpoint-2" / T.STATE_FILE, mixed / T.STATE_FILE)  # another run's optimizer state
    with pytest.raises(C.CheckpointError,
                       match="trainer_state.pt (differs from the manifest|is .* bytes, the manifest records)"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "o1"), "resume": str(mixed)}))
    # even with the manifest rewritten to match, the run ids inside disagree
    shutil.copy(other / "checkpoint-2" / C.MANIFEST, mixed / C.MANIFEST)
    with pytest.raises(C.CheckpointError, match="adapter"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "o2"), "resume": str(mixed), "seed": 1}))
    # another configuration (seed) resuming this run's checkpoint
    with pytest.raises(C.CheckpointError, match="another run configuration"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "o3"), "resume": str(out / "checkpoint-2"),
                           "seed": 1}))
    # no manifest (interrupted old-style save, or another tool); a truncated file
    bare = tmp_path / "bare"
    shutil.copytree(out / "checkpoint-2", bare)
    os.unlink(bare / C.MANIFEST)
    with pytest.raises(C.CheckpointError, match="incomplete or not a ktmoe checkpoint"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "o4"), "resume": str(bare)}))
    short = tmp_path / "short"
    shutil.copytree(out / "checkpoint-2", short)
    open(short / T.STATE_FILE, "wb").close()
    with pytest.raises(C.CheckpointError, match="0 bytes, the manifest records"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "o5"), "resume": str(short)}))


def test_rerun_into_an_old_folder_replaces_whole_checkpoints(full, tmp_path):
    out = tmp_path / "run"
    train(make_config({**BASE, "output_dir": str(out), "seed": 1}))
    res = train(make_config({**BASE, "output_dir": str(out)}))
    for n in ("checkpoint-2", "checkpoint-4"):
        m = C.verify(str(out / n), res.config.to_dict())
        state = torch.load(out / n / T.STATE_FILE, weights_only=False)
        assert state["run_id"] == m["run_id"] and m["seed"] == 0


def test_disk_full_is_reported_and_earlier_checkpoints_survive(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second checkpoint's trainer state: the disk fills up
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 51584 vs 51472")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(T.torch, "save", save)
    import shutil as sh
    usage = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(p)._replace(free=1 << 10) if calls[0] >= 2 else usage(p))
    with pytest.raises(C.CheckpointError, match="disk full while writing the checkpoint"):
        train(make_config({**BASE, "output_dir": str(out)}))
    C.verify(str(out / "checkpoint-2"))
    assert not [n for n in os.listdir(out) if C.TMP_MARK in n]


def test_unwritable_output_dir_found_before_training(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    steps = []
    monkeypatch.setattr(T, "run_steps", lambda *a, **k: steps.append(1))
    with pytest.raises(C.CheckpointError, match="is not writable"):
        train(make_config({**BASE, "output_dir": str(blocker / "out")}))
    assert not steps
    import shutil as sh
    usage = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(p)._replace(free=100))
    with pytest.raises(C.CheckpointError, match="bytes free, a checkpoint needs about"):
        train(make_config({**BASE, "output_dir": str(tmp_path / "out")}))
    assert not steps
