"""The GPU + CPU-experts path of ktmoe.parallel.distributed_data_parallel on one CUDA device (NCCL, one rank: the
device hosts have one GPU): attention and the rest on the GPU, the routed experts' LoRA on the CPU reduced over
the helper's gloo group; one training step equals the same step without DDP. Skipped without CUDA (run by
tools/device_amx_check.sh on the device host)."""
import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
import torch.distributed as dist  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from ktmoe.parallel import distributed_data_parallel  # noqa: E402


def test_one_rank_nccl_ddp_with_cpu_experts_equals_no_ddp(tmp_path):
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = kh.tiny_model("qwen3_moe", seed=3)
        kh.convert_model(model, lora_rank=4, lora_alpha=8.0, seed=3, cpuinfer_threads=1)
        model.to("cuda")
        pm = kh.add_lora(model, r=4, lora_alpha=8.0)
        ref = copy.deepcopy(pm)
        experts = next(iter(kh.routed_experts(pm).values()))
        assert all(p.device.type == "cpu" for p in experts.lora_parameters)
        ddp = distributed_data_parallel(pm, device_ids=[0])
        x = torch.randint(0, 64, (2, 8), device="cuda")
        for m in (ddp, ref):
            m(input_ids=x, labels=x).loss.backward()
        got, want = dict(kh.trainable_parameters(pm)), dict(kh.trainable_parameters(ref))
        for n in want:
            torch.testing.assert_close(got[n].grad, want[n].grad, rtol=1e-5, atol=1e-7, msg=n)
    finally:
        if started:
            dist.destroy_process_group()
