"""merge_and_unload().save_pretrained(dir) of a converted model: a full transformers checkpoint whose experts hold
W + s*B*A, loadable by plain transformers with no missing keys and the same logits."""
import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from conftest import randomized_lora_model, rel, tiny  # noqa: E402
from tolerances import HF_MERGED_LOGITS_RTOL, HF_MERGED_WEIGHT_ATOL, SAME_PATH_REL_L2  # noqa: E402

FAMILIES = sorted(kh.families()) + ["deepseek_v2_greedy"]  # see conftest.TINY_VARIANTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomized(family, seed, method="AMXBF16_SFT", dtype=None):
    return randomized_lora_model(family, seed, method=method, dtype=dtype)


def probe():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(7))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe()).logits.float()


def load_plain(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_checkpoint_loads_in_plain_transformers_with_the_same_logits(tmp_path, family):
    pm = randomized(family, seed=61)
    kh.save_adapter(pm, str(tmp_path / "adapter"))
    before = logits(pm)
    merged = pm.merge_and_unload()
    assert kh.routed_experts(merged) and all(m.lora_merged for m in kh.routed_experts(merged).values())
    # PEFT folds the attention LoRA into its weights (fp32 sums in another order); the experts compute the same
    assert rel(logits(merged), before) < SAME_PATH_REL_L2
    merged.save_pretrained(str(tmp_path / "full"), max_shard_size="40KB")  # sharded non-expert part too
    files = os.listdir(tmp_path / "full")
    index = json.loads((tmp_path / "full" / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert sorted(set(index["weight_map"].values())) == shards and "model.safetensors" not in files
    assert len(shards) >= 1 + len(kh.routed_experts(merged))  # one shard per MoE layer's experts
    plain = load_plain(tmp_path / "full")
    assert not kh.routed_experts(plain)
    assert rel(logits(plain), before) < HF_MERGED_LOGITS_RTOL

    # the experts hold W + s B A: PEFT's own merge of the same adapter on the unconverted model
    ref = peft.PeftModel.from_pretrained(tiny(family, seed=61), str(tmp_path / "adapter")).merge_and_unload()
    fam = kh.get_family(ref)
    ours = {n: m for n, m in plain.named_modules() if fam.is_experts(n, m)}
    theirs = {n: m for n, m in ref.named_modules() if fam.is_experts(n, m)}
    assert ours.keys() == theirs.keys() and ours
    for n in ours:
        for t in ("gate_up_proj", "down_proj"):
            a, b = getattr(ours[n], t), getattr(theirs[n], t)
            assert torch.allclose(a, b, atol=HF_MERGED_WEIGHT_ATOL, rtol=0), (n, t, (a - b).abs().max())


def test_bf16_and_quantized_experts_export_in_the_model_dtype(tmp_path):
    pm = randomized("qwen3_moe", seed=62, method="AMXINT8_SFT", dtype=torch.bfloat16)
    before = logits(pm)
    pm.merge_and_unload().save_pretrained(str(tmp_path))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    expert_keys = [k for k in index["weight_map"] if ".experts." in k]
    assert expert_keys
    for k in expert_keys[:4]:
        with safe_open(str(tmp_path / index["weight_map"][k]), framework="pt") as f:
            assert f.get_slice(k).get_dtype() == "BF16", k
    plain = load_plain(tmp_path)
    assert rel(logits(plain), before) < 5e-2  # the whole model in bf16 on both sides


def test_unload_writes_the_frozen_experts_and_unmerged_saves_are_refused(tmp_path):
    pm = randomized("mixtral", seed=63)
    base = kh.base_model_of(pm)
    with pytest.raises(ValueError, match="merge_and_unload"):
        base.save_pretrained(str(tmp_path / "half"))  # PEFT layers still in: never half a model
    plain_base = logits(kh.tiny_model("mixtral", seed=63))
    unloaded = pm.unload()
    assert rel(logits(unloaded), plain_base) < HF_MERGED_LOGITS_RTOL  # the LoRA no longer applies
    unloaded.save_pretrained(str(tmp_path / "base"))
    assert rel(logits(load_plain(tmp_path / "base")), plain_base) < HF_MERGED_LOGITS_RTOL
