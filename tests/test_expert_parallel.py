"""Expert parallelism over 2 and 3 gloo ranks on the CPU (each launched by torch.distributed.run, 1 engine thread
and 1 torch thread per rank; tests/expert_parallel_worker.py): one layer equals one wrapper holding all experts,
training equals one process on the combined batch, the adapter gathered by save_adapter equals the single-process
one and comes back block by block."""
import os
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tolerances import DIST_EP_ADAPTER_REL, DIST_EP_LOSS_REL, DIST_REORDER_REL  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from ktmoe.parallel import expert_blocks  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "expert_parallel_worker.py")
sys.path.insert(0, HERE)
from expert_parallel_worker import TINY  # noqa: E402
from launch import launch  # noqa: E402


def _run(case: str, out, world: int):
    os.makedirs(out, exist_ok=True)
    launch([WORKER, case, str(out)], world)
    return [torch.load(os.path.join(out, f"result_{r}.pt")) for r in range(world)]


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A checkpoint (hf/) and a ktmoe weight folder (kt/) of the tiny model, beside the runs' output folders."""
    from ktmoe.convert import convert_checkpoint

    base = tmp_path_factory.mktemp("ep")
    kh.tiny_model("qwen3_moe", seed=3, **TINY).save_pretrained(base / "hf")
    convert_checkpoint(str(base / "hf"), str(base / "kt"), "AMXBF16_SFT", progress=False)
    return base


def test_expert_blocks():
    assert expert_blocks(8, 3) == (0, 3, 6, 8)
    assert expert_blocks(256, 4) == (0, 64, 128, 192, 256)
    assert expert_blocks(5, 5) == (0, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="at least as many experts"):
        expert_blocks(2, 3)


@pytest.mark.parametrize("world,src", [(2, "tensors"), (3, "tensors+folder+mmap+hf")])
def test_layer_equals_one_wrapper_with_all_experts(sources, world, src):
    results = _run(f"layer,src={src}", sources / f"layer{world}", world)
    blocks = [results[r][src.split("+")[0]]["block"] for r in range(world)]
    assert [b for b, _ in blocks] + [blocks[-1][1]] == list(expert_blocks(TINY["num_experts"], world))
    for r, res in enumerate(results):
        for s, d in res.items():
            assert d["local_experts"] == blocks[r][1] - blocks[r][0]
            for k in ("y", "dx", "dw"):
                assert _rel(d[k], d[k + "_ref"]) < DIST_REORDER_REL, f"rank {r} ({s}): {k}"
            assert _rel(d["y_nograd"], d["y_ref"]) < DIST_REORDER_REL
            for n, g in d["lora_grad"].items():  # the owner holds every rank's contribution to its block
                assert _rel(g, d["lora_grad_ref"][n]) < DIST_REORDER_REL, f"rank {r} ({s}): {n}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    base = tmp_path_factory.mktemp("ep_single")
    cases = {"gc=0": "gc=0", "gc=1": "gc=1", "family=deepseek_v3": "family=deepseek_v3"}
    return {c: (_run(f"train,save=1,{c}", base / c, 1)[0], base / c) for c in cases}


@pytest.mark.parametrize("world,case", [(2, "gc=0"), (3, "gc=0"), (2, "gc=1"), (2, "family=deepseek_v3")])
def test_training_equals_one_process(tmp_path, single, world, case):
    """deepseek_v3: group-limited routing (4 experts in 2 groups, topk_group 1), each rank owning one group."""
    ref, ref_dir = single[case]
    results = _run(f"train,save=1,{case}", tmp_path, world)
    for r in results:
        assert r["losses"] == results[0]["losses"]  # the global loss, on every rank
        assert r["reload_max_diff"] == 0.0          # load_adapter / from_adapter: each rank its block, exactly
    for a, b in zip(results[0]["losses"], ref["losses"]):
        assert abs(a - b) / abs(b) < DIST_EP_LOSS_REL
    got = load_file(os.path.join(tmp_path, "adapter", "adapter_model.safetensors"))
    want = load_file(os.path.join(ref_dir, "adapter", "adapter_model.safetensors"))
    assert set(got) == set(want) and all(got[k].shape == want[k].shape for k in want)
    for k in want:
        assert _rel(got[k], want[k]) < DIST_EP_ADAPTER_REL, k
    assert sorted(os.listdir(os.path.join(tmp_path, "adapter"))) == sorted(os.listdir(os.path.join(ref_dir,
                                                                                                    "adapter")))


def test_refusals(tmp_path):
    model = kh.tiny_model("qwen3_moe", seed=3, **TINY)
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed initialised"):
            kh.convert_model(model, lora_rank=2, lora_alpha=4.0, expert_parallel=True)
    with pytest.raises(ValueError, match="process_group= is for expert_parallel=True"):
        kh.convert_model(model, lora_rank=2, lora_alpha=4.0, process_group=object())
    with pytest.raises(TypeError, match="expert_parallel must be True or False"):
        kh.convert_model(model, lora_rank=2, lora_alpha=4.0, expert_parallel="yes")


def test_one_rank_group_and_what_an_expert_parallel_layer_refuses(tmp_path):
    """In this process, a gloo group of one: the layer equals the plain one; copying, merged export and DDP
    (which would all-reduce per-rank blocks) are refused with the reason."""
    import copy

    from ktmoe.parallel import distributed_data_parallel

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        a, b = kh.tiny_model("qwen3_moe", seed=3, **TINY), kh.tiny_model("qwen3_moe", seed=3, **TINY)
        kh.convert_model(a, lora_rank=2, lora_alpha=4.0, seed=1, cpuinfer_threads=1, expert_parallel=True)
        kh.convert_model(b, lora_rank=2, lora_alpha=4.0, seed=1, cpuinfer_threads=1)
        x = torch.randint(0, 64, (2, 6))
        with torch.no_grad():
            assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)
        ep = next(iter(kh.routed_experts(a).values()))
        assert "expert_parallel=(rank 0 of 1: experts [0, 8) of 8)" in repr(ep)
        with pytest.raises(TypeError, match="expert-parallel ktmoe layer"):
            copy.deepcopy(ep)
        with pytest.raises(NotImplementedError, match="each rank holds only its block"):
            ep.merged_weights(torch.bfloat16)
        with pytest.raises(ValueError, match="sync_gradients"):
            distributed_data_parallel(kh.add_lora(a, r=2, lora_alpha=4.0))
    finally:
        if started:
            dist.destroy_process_group()
