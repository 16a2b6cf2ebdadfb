"""The Hugging Face paths people already use: transformers.Trainer (save_model, checkpoints,
resume_from_checkpoint) and TRL's SFTTrainer, with a converted model, no extra step. Real Trainer, real PEFT."""
import json
import os
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it
from safetensors.torch import load_file, save_file  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS, rel, tiny  # noqa: E402
from tolerances import HF_DROPPED_LORA_FACTOR, HF_LOGITS_RTOL  # noqa: E402

FAMILIES = sorted(kh.families()) + ["deepseek_v2_greedy"]  # see conftest.TINY_VARIANTS
R, ALPHA = 4, 8.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def converted(family, seed, lora_seed=None):
    """Tiny model of `seed`, converted, attention LoRA added; LoRA initial values from `lora_seed` (default seed)."""
    lora_seed = seed if lora_seed is None else lora_seed
    model = tiny(family, seed=seed)
    kh.convert_model(model, lora_rank=R, lora_alpha=ALPHA, seed=lora_seed, cpuinfer_threads=THREADS)
    torch.manual_seed(lora_seed + 1)  # PEFT's LoRA init
    return kh.add_lora(model, r=4, lora_alpha=8.0)


class Tokens(torch.utils.data.Dataset):
    """Fixed-length random token rows: causal LM examples with labels = inputs (no tokenizer needed)."""

    def __init__(self, n=16, seq=12, seed=0):
        self.x = torch.randint(0, 64, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def training_args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, learning_rate=5e-2,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0, gradient_checkpointing=True)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def probe():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(99))


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe()).logits.float()


def expert_keys(sd):
    return sorted(k for k in sd if ".experts." in k)


def drop_expert_lora(src, dst):
    """A copy of a saved adapter without its expert LoRA (what PEFT's save_pretrained wrote before)."""
    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if ".experts." not in k}, os.path.join(dst, "adapter_model.safetensors"))
    cfg = json.loads(open(os.path.join(dst, "adapter_config.json")).read())
    cfg["target_parameters"] = None
    cfg["rank_pattern"], cfg["alpha_pattern"] = {}, {}
    with open(os.path.join(dst, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_save_model_loads_in_plain_peft_with_the_trained_logits(tmp_path, family):
    seed = 31
    pm = converted(family, seed)
    trainer = transformers.Trainer(model=pm, args=training_args(tmp_path / "run"), train_dataset=Tokens(seed=seed))
    out = trainer.train()
    assert out.global_step == 4
    expert = next(iter(kh.routed_experts(pm).values()))
    assert expert.down_lora_b.abs().max() > 0  # the expert LoRA trained (B starts at zero)
    trained = logits(pm)
    trainer.save_model(str(tmp_path / "final"))

    sd = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert len(expert_keys(sd)) == 4 * len(kh.routed_experts(pm))
    cfg = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    plain = peft.PeftModel.from_pretrained(tiny(family, seed=seed), str(tmp_path / "final"))
    assert not kh.routed_experts(plain)
    err = rel(logits(plain), trained)
    assert err < HF_LOGITS_RTOL, f"{family}: plain PEFT logits differ by {err:.2e}"

    # the check is sensitive: the same adapter without its expert LoRA fails it
    drop_expert_lora(tmp_path / "final", tmp_path / "dropped")
    lost = peft.PeftModel.from_pretrained(tiny(family, seed=seed), str(tmp_path / "dropped"))
    err_lost = rel(logits(lost), trained)
    assert err_lost > HF_DROPPED_LORA_FACTOR * HF_LOGITS_RTOL, f"{family}: dropping the expert LoRA moves the " \
                                                               f"logits by only {err_lost:.2e}"
    # and back into ktmoe from the Trainer's folder
    back = kh.from_adapter(tiny(family, seed=seed), str(tmp_path / "final"), cpuinfer_threads=THREADS)
    assert torch.equal(logits(back), trained)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "deepseek_v2_greedy"])
def test_resume_from_checkpoint_is_exact(tmp_path, family):
    """6 steps straight vs 3 steps, checkpoint, a fresh process-like restart (new model, new Trainer) resumed from
    it: every trainable tensor (expert LoRA, attention LoRA) bit-identical; the checkpoint holds the optimizer
    state of the expert LoRA too (AdamW moments: exactness needs them)."""
    seed = 41
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    a = converted(family, seed)
    ta = transformers.Trainer(model=a, args=training_args(tmp_path / "a", **args), train_dataset=Tokens(seed=seed))
    ta.train()
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert len(expert_keys(load_file(str(ckpt / "adapter_model.safetensors")))) == 4 * len(kh.routed_experts(a))
    opt = torch.load(ckpt / "optimizer.pt", weights_only=False)
    n_trainable = len(kh.trainable_parameters(a))
    assert len(opt["state"]) == n_trainable  # every trainable tensor, expert LoRA included, has Adam moments

    b = converted(family, seed, lora_seed=seed + 100)  # other LoRA values: they must come from the checkpoint
    tb = transformers.Trainer(model=b, args=training_args(tmp_path / "b", **args), train_dataset=Tokens(seed=seed))
    tb.train(resume_from_checkpoint=str(ckpt))
    pa, pb = kh.trainable_parameters(a), kh.trainable_parameters(b)
    assert [n for n, _ in pa] == [n for n, _ in pb]
    for (n, p), (_, q) in zip(pa, pb):
        assert torch.equal(p, q), f"{n}: max |diff| {(p - q).abs().max():.3e}"
    experts = [n for n, _ in pa if ".experts." in n]
    assert len(experts) == 6 * len(kh.routed_experts(a))


def tiny_tokenizer():
    """A word-level tokenizer built in memory (no hub): SFTTrainer wants a processing class; the data is ids."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "a": 2}, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer_trains_and_saves_the_expert_lora(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    family, seed = "qwen3_moe", 51
    pm = converted(family, seed)
    rows = Tokens(n=8, seed=seed).x
    ds = datasets.Dataset.from_dict({"input_ids": [r.tolist() for r in rows]})
    cfg = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=2,
                        learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, gradient_checkpointing=True,
                        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False,
                        bf16=False)  # TRL defaults to bf16; fp32 keeps the comparison with plain PEFT clean
    def collate(rows):
        x = torch.tensor([r["input_ids"] for r in rows])
        return {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}

    trainer = trl.SFTTrainer(model=pm, args=cfg, train_dataset=ds, data_collator=collate,
                             processing_class=tiny_tokenizer())
    trainer.train()
    expert = next(iter(kh.routed_experts(pm).values()))
    assert expert.down_lora_b.abs().max() > 0
    trained = logits(pm)
    trainer.save_model(str(tmp_path / "final"))
    sd = load_file(str(tmp_path / "final" / "adapter_model.safetensors"))
    assert len(expert_keys(sd)) == 4 * len(kh.routed_experts(pm))
    plain = peft.PeftModel.from_pretrained(tiny(family, seed=seed), str(tmp_path / "final"))
    assert rel(logits(plain), trained) < HF_LOGITS_RTOL
