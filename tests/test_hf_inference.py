"""Inference methods through the same seam: convert_model(mode="inference", method="AMXINT4" | ...) and
from_adapter(..., mode="inference"), for generate() with quantized experts; the K-group default group size."""
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW_TOKENS = 8


def generate(model):
    model.eval()
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, 5 + NEW_TOKENS)
    return out


@pytest.mark.parametrize("method", ["AMXINT4", "AMXINT8", "AMXINT4_1KGroup"])
def test_inference_method_generates_the_tokens_of_the_sft_path(method):
    inf = kh.tiny_model("qwen3_moe", seed=71)
    kh.convert_model(inf, mode="inference", method=method, cpuinfer_threads=THREADS)
    m = next(iter(kh.routed_experts(inf).values()))
    assert m.wrapper.method == method and not m.trains and not list(m.parameters())
    sft = kh.tiny_model("qwen3_moe", seed=71)  # the same weights, quantized the same way, through the SFT path
    kh.convert_model(sft, method=method + "_SFT", lora_rank=0, lora_alpha=1.0, cpuinfer_threads=THREADS)
    assert torch.equal(generate(inf), generate(sft))


def test_from_adapter_in_inference_mode_applies_the_lora(tmp_path):
    pm = kh.tiny_model("deepseek_v3", seed=72)
    kh.convert_model(pm, lora_rank=4, lora_alpha=8.0, seed=72, cpuinfer_threads=THREADS)
    pm = kh.add_lora(pm, r=4, lora_alpha=8.0)
    g = torch.Generator().manual_seed(73)
    with torch.no_grad():
        for _, p in kh.trainable_parameters(pm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    kh.save_adapter(pm, str(tmp_path))
    inf = kh.from_adapter(kh.tiny_model("deepseek_v3", seed=72), str(tmp_path), mode="inference",
                          method="AMXINT4", cpuinfer_threads=THREADS)
    sft = kh.from_adapter(kh.tiny_model("deepseek_v3", seed=72), str(tmp_path), method="AMXINT4_SFT",
                          cpuinfer_threads=THREADS)
    assert torch.equal(generate(inf), generate(sft))
    m = next(iter(kh.routed_experts(inf).values()))
    assert m.lora_rank == 4 and not any(p.requires_grad for p in m.lora_parameters)
    base = kh.tiny_model("deepseek_v3", seed=72)
    kh.convert_model(base, mode="inference", method="AMXINT4", cpuinfer_threads=THREADS)
    with torch.no_grad():  # the LoRA is applied
        x = torch.randint(0, 64, (1, 6))
        inf.eval(), base.eval()
        assert not torch.allclose(inf(input_ids=x).logits, base(input_ids=x).logits, atol=1e-3)


def test_inference_experts_refuse_to_train():
    model = kh.tiny_model("qwen3_moe", seed=74)
    kh.convert_model(model, mode="inference", method="AMXINT8", cpuinfer_threads=THREADS)
    emb = model.get_input_embeddings()(torch.randint(0, 64, (1, 4))).detach().requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference method"):
        model(inputs_embeds=emb)
    with pytest.raises(ValueError, match="expert LoRA|lora_rank=0"):
        kh.add_lora(model)


def test_k_group_default_is_the_largest_valid_group():
    assert kh.default_group_size(7168, 2048) == 128
    assert kh.default_group_size(32, 16) == 16
    assert kh.default_group_size(96, 48) == 48
    assert kh.default_group_size(32, 24, threadpool_count=2) == 4  # the TP slice of 12 columns
    with pytest.raises(ValueError, match="group_size"):
        kh.default_group_size(32, 9)
    model = kh.tiny_model("qwen3_moe", seed=75)  # H=32, I=16: 128 does not divide either
    kh.convert_model(model, mode="inference", method="AMXINT4_KGroup", cpuinfer_threads=THREADS)
    assert {m.wrapper.group_size for m in kh.routed_experts(model).values()} == {16}
    odd = kh.tiny_model("qwen3_moe", seed=75, moe_intermediate_size=9)
    with pytest.raises(ValueError, match="no group size <= 128 fits hidden_size=32"):
        kh.convert_model(odd, mode="inference", method="AMXINT4_KGroup", cpuinfer_threads=THREADS)
    with pytest.raises(ValueError, match="group_size=32 applies to K-group methods only"):
        kh.convert_model(kh.tiny_model("qwen3_moe"), mode="inference", method="AMXINT4", group_size=32)
