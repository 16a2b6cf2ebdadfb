"""Regression tests, one per defect of issue #12: deepcopy / torch.save, state_dict with the expert LoRA,
weight_path, DDP-wrapped models, keyword arguments that do not apply, ktmoe.train without tokenizer files."""
import copy
import io
import json

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS, randomized_lora_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_like(family="qwen3_moe", seed=81, **convert):
    return randomized_lora_model(family, seed, **convert)


def logits(model):
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=x).logits


def test_deepcopy_is_an_independent_model_sharing_only_the_frozen_weights():
    pm = trained_like()
    before = logits(pm)
    twin = copy.deepcopy(pm)
    assert torch.equal(logits(twin), before)
    a, b = next(iter(kh.routed_experts(pm).values())), next(iter(kh.routed_experts(twin).values()))
    assert a.wrapper is not b.wrapper and a.gate_lora_a is not b.gate_lora_a
    with torch.no_grad():
        b.down_lora_b.add_(1.0)
    assert torch.equal(logits(pm), before) and not torch.equal(logits(twin), before)
    x = torch.randint(0, 64, (1, 6))
    twin(input_ids=x, labels=x).loss.backward()  # the copy trains
    assert b.gate_lora_a.grad is not None and a.gate_lora_a.grad is None


def test_torch_save_of_the_model_and_of_its_state_dict(tmp_path):
    pm = trained_like(seed=82)
    before = logits(pm)
    buf = io.BytesIO()
    torch.save(pm, buf)
    buf.seek(0)
    assert torch.equal(logits(torch.load(buf, weights_only=False)), before)

    sd = pm.state_dict()
    name = next(iter(kh.routed_experts(pm)))
    keys = [k for k in sd if f".{name}." in k]
    assert sorted(k.split(name + ".", 1)[1] for k in keys) == [
        "base_layer.lora_A.default.weight", "base_layer.lora_B.default.weight", "lora_A.default.weight",
        "lora_B.default.weight"]  # PEFT's target_parameters layout, the expert LoRA included
    torch.save(sd, tmp_path / "sd.pt")
    fresh = trained_like(seed=82)
    with torch.no_grad():
        for _, p in kh.trainable_parameters(fresh):
            p.zero_()
    result = fresh.load_state_dict(torch.load(tmp_path / "sd.pt"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(logits(fresh), before)
    for (n, p), (_, q) in zip(kh.trainable_parameters(pm), kh.trainable_parameters(fresh)):
        assert torch.equal(p, q), n
    # plain transformers tensors are not silently dropped by a converted model
    bad = {f"base_model.model.{name}.gate_up_proj": torch.zeros(1)}
    assert f"base_model.model.{name}.gate_up_proj" in fresh.load_state_dict(bad, strict=False).unexpected_keys


def test_weight_path_is_used_or_refused(tmp_path):
    from ktmoe.convert import convert_checkpoint

    with pytest.raises(FileNotFoundError, match="weight_path='/nonexistent'"):
        kh.convert_model(kh.tiny_model("qwen3_moe"), lora_rank=2, lora_alpha=4.0, weight_path="/nonexistent")
    with pytest.raises(FileNotFoundError, match="ktmoe_weights.json"):
        kh.convert_model(kh.tiny_model("qwen3_moe"), lora_rank=2, lora_alpha=4.0, weight_path=str(tmp_path))
    src = kh.tiny_model("qwen3_moe", seed=83)
    src.save_pretrained(tmp_path / "hf")
    convert_checkpoint(str(tmp_path / "hf"), str(tmp_path / "kt"), "AMXINT8_SFT", progress=False)
    a = kh.tiny_model("qwen3_moe", seed=83)
    with torch.no_grad():  # the folder, not the model's own expert tensors, must be what runs
        for n, m in a.named_modules():
            if kh.get_family(a).is_experts(n, m):
                m.gate_up_proj.zero_()
                m.down_proj.zero_()
    kh.convert_model(a, lora_rank=2, lora_alpha=4.0, method="AMXINT8_SFT", weight_path=str(tmp_path / "kt"),
                     cpuinfer_threads=THREADS)
    b = kh.tiny_model("qwen3_moe", seed=83)
    kh.convert_model(b, lora_rank=2, lora_alpha=4.0, method="AMXINT8_SFT", cpuinfer_threads=THREADS)
    assert torch.equal(logits(a), logits(b))


def test_every_function_unwraps_ddp(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        pm = trained_like(seed=84)
        ddp = DDP(pm)
        assert kh.routed_experts(ddp) and kh.base_model_of(ddp) is pm.get_base_model()
        assert [n for n, _ in kh.trainable_parameters(ddp)] == [n for n, _ in kh.trainable_parameters(pm)]
        kh.save_adapter(ddp, str(tmp_path / "adapter"))
        kh.load_adapter(ddp, str(tmp_path / "adapter"))
        sd, _ = kh.adapter_state_dict(ddp)
        assert any(".experts." in k for k in sd)
        back = kh.from_adapter(kh.tiny_model("qwen3_moe", seed=84), str(tmp_path / "adapter"),
                               cpuinfer_threads=THREADS)
        assert torch.equal(logits(back), logits(pm))
    finally:
        if started:
            dist.destroy_process_group()


def test_keyword_arguments_that_do_not_apply_are_refused():
    m = kh.tiny_model("qwen3_moe")
    with pytest.raises(TypeError, match="unexpected keyword argument.*grop_size"):
        kh.convert_model(m, lora_rank=2, lora_alpha=4.0, grop_size=64)
    with pytest.raises(TypeError, match="num_experts come.*from the model"):
        kh.convert_model(m, lora_rank=2, lora_alpha=4.0, num_experts=4)
    with pytest.raises(ValueError, match="AMXINT4 is an inference method, use mode='inference'"):
        kh.convert_model(m, lora_rank=2, lora_alpha=4.0, method="AMXINT4")
    with pytest.raises(ValueError, match="training method"):
        kh.convert_model(m, mode="inference", method="AMXINT4_SFT")
    with pytest.raises(TypeError, match="needs lora_rank= and lora_alpha="):
        kh.convert_model(m)
    with pytest.raises(ValueError, match="lora_dropout"):
        kh.convert_model(m, lora_rank=2, lora_alpha=4.0, lora_dropout=0.1)
    with pytest.raises(TypeError, match="lora_rank comes from the adapter"):
        kh.from_adapter(m, "/nonexistent", lora_rank=2)
    assert not kh.routed_experts(m)  # nothing was converted by the refused calls
    kh.convert_model(m, lora_rank=2, lora_alpha=4.0, cpuinfer_threads=THREADS)
    with pytest.raises(ValueError, match="use_dora"):
        kh.add_lora(m, use_dora=True)
    with pytest.raises(TypeError):
        kh.add_lora(m, lora_alhpa=4.0)  # PEFT's LoraConfig refuses it


def test_train_names_the_missing_tokenizer_files_before_any_work(tmp_path, capsys):
    from ktmoe.train.__main__ import main

    kh.tiny_model("mixtral").save_pretrained(tmp_path / "model")  # weights and config, no tokenizer
    capsys.readouterr()  # the save's progress bar
    out = tmp_path / "out"
    assert main(["--model", str(tmp_path / "model"), "--output-dir", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ktmoe.train: error: model:") and "no tokenizer files" in err and "tokenizer.json" in err
    assert not out.exists()
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == "mixtral"
