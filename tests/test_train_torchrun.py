"""`python -m ktmoe.train` under torchrun (2 gloo ranks, 1 engine thread and 1 torch thread each): the same
losses and adapter as one process on the same global batch, one output folder written by rank 0, exact resume."""
import os

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

from launch import launch  # noqa: E402
from tolerances import DIST_REORDER_REL, DIST_TRAIN_ADAPTER_REL, DIST_TRAIN_LOSS_REL  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

JOB = ["--steps", "4", "--batch-size", "4", "--save-every", "2", "--no-compare", "--cpuinfer-threads", "1",
       "--torch-threads", "1", "--no-progress"]


def _run(args, nproc=None):
    return launch(["-m", "ktmoe.train"] + JOB + args, nproc, timeout=240)


def _losses(folder):
    return torch.load(os.path.join(folder, "checkpoint-4", "trainer_state.pt"), weights_only=False)["losses"]


def _adapter(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_torchrun_equals_one_process_and_resumes_exactly(tmp_path):
    single, full, resumed = (str(tmp_path / n) for n in ("single", "dist", "resumed"))
    _run(["--output-dir", single])
    proc = _run(["--output-dir", full], nproc=2)
    assert proc.stdout.count("ktmoe.train summary") == 1  # rank 0 reports, rank 1 is silent
    assert "split over 2 ranks" in proc.stdout

    a, b = _losses(single), _losses(full)
    assert len(a) == len(b) == 4
    assert abs(a[0] - b[0]) <= DIST_REORDER_REL * abs(a[0]), (a, b)  # before any update
    assert all(abs(x - y) <= DIST_TRAIN_LOSS_REL * abs(x) for x, y in zip(a, b)), (a, b)
    sa, sb = _adapter(single), _adapter(full)
    assert sorted(sa) == sorted(sb)
    worst = max(float((sa[k] - sb[k]).norm() / sa[k].norm()) for k in sa)
    assert worst <= DIST_TRAIN_ADAPTER_REL, worst

    # one output folder, the same files as the single-process run's (no second rank's copies, no temporaries)
    assert _tree(full) == _tree(single), (_tree(full), _tree(single))

    # resume mid-run under torchrun: every rank restores the step-2 checkpoint; the rest is recomputed exactly
    proc = _run(["--output-dir", resumed, "--resume", os.path.join(full, "checkpoint-2")], nproc=2)
    assert "(resumed)" in proc.stdout
    assert _losses(resumed) == b
    sr = _adapter(resumed)
    assert all(torch.equal(sr[k], sb[k]) for k in sb), max(float((sr[k] - sb[k]).abs().max()) for k in sb)


def test_torchrun_expert_parallel_equals_one_process_and_resumes_exactly(tmp_path):
    """--expert-parallel: each rank holds half of every layer's experts; the checkpoint holds whole tensors (the
    experts' optimizer state gathered), so the run equals one process, and resumes exactly."""
    single, full, resumed = (str(tmp_path / n) for n in ("single", "ep", "resumed"))
    _run(["--output-dir", single])
    proc = _run(["--output-dir", full, "--expert-parallel"], nproc=2)
    assert "expert-parallel (rank 0 of 2: experts [0, " in proc.stdout
    a, b = _losses(single), _losses(full)
    assert abs(a[0] - b[0]) <= DIST_REORDER_REL * abs(a[0]), (a, b)
    assert all(abs(x - y) <= DIST_TRAIN_LOSS_REL * abs(x) for x, y in zip(a, b)), (a, b)
    sa, sb = _adapter(single), _adapter(full)
    assert sorted(sa) == sorted(sb)
    worst = max(float((sa[k] - sb[k]).norm() / sa[k].norm()) for k in sa)
    assert worst <= DIST_TRAIN_ADAPTER_REL, worst
    assert _tree(full) == _tree(single)
    # the experts' optimizer state is whole in the checkpoint: the same tensors as one process's
    st_a = torch.load(os.path.join(single, "checkpoint-4", "trainer_state.pt"), weights_only=False)["optimizer"]
    st_b = torch.load(os.path.join(full, "checkpoint-4", "trainer_state.pt"), weights_only=False)["optimizer"]
    assert [{k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)} for s in st_a["state"].values()] == \
        [{k: tuple(v.shape) for k, v in s.items() if torch.is_tensor(v)} for s in st_b["state"].values()]

    proc = _run(["--output-dir", resumed, "--resume", os.path.join(full, "checkpoint-2"), "--expert-parallel"],
                nproc=2)
    assert "(resumed)" in proc.stdout
    assert _losses(resumed) == b
    sr = _adapter(resumed)
    assert all(torch.equal(sr[k], sb[k]) for k in sb), max(float((sr[k] - sb[k]).abs().max()) for k in sb)
    # the same checkpoint resumed by one process holding every expert: the run goes on as it would have
    one = str(tmp_path / "one")
    _run(["--output-dir", one, "--resume", os.path.join(full, "checkpoint-2")])
    assert all(abs(x - y) <= DIST_TRAIN_LOSS_REL * abs(x) for x, y in zip(_losses(one), b)), (_losses(one), b)


def test_expert_parallel_needs_torchrun(tmp_path):
    proc = launch(["-m", "ktmoe.train", "--expert-parallel", "--output-dir", str(tmp_path / "x")] + JOB, timeout=240,
                  check=False)
    assert proc.returncode != 0 and "expert_parallel needs more than one process" in proc.stdout + proc.stderr
