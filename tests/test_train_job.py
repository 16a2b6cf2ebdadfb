"""The training job: `python -m ktmoe.train` (embedded default, local checkpoint + data), config checking,
data loading, resume."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS  # noqa: E402  (one engine size for the whole suite)
from ktmoe.train import data as D  # noqa: E402
from ktmoe.train.__main__ import main  # noqa: E402
from ktmoe.train.config import ConfigError, load_config, make_config  # noqa: E402
from ktmoe.train.trainer import build_base_model, train  # noqa: E402

CURVE_ATOL = 2e-2  # first 20 steps of the default job, ktmoe vs plain PyTorch (see test_hf_families.py)


# ------------------------------------------------------------------ the embedded default

def test_default_job_runs_from_the_command_line_and_its_loss_falls(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ktmoe.train", "--steps", "40", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = proc.stdout
    assert "ktmoe.train summary" in summary and "loss curve" in summary and "speed-up" in summary
    assert "tok/s" in proc.stderr  # the progress line
    state = torch.load(out / "checkpoint-40" / "trainer_state.pt", weights_only=False)
    losses = state["losses"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3, losses
    # the adapter loads in plain transformers + PEFT
    cfg = make_config({})
    plain = peft.PeftModel.from_pretrained(build_base_model(cfg, D.ByteTokenizer()), str(out / "adapter"))
    batch = D.Batches(D.build_dataset(D.ByteTokenizer(), D.load_conversations(D.DEFAULT_DATA), 256), 8, 0).batch(0)
    with torch.no_grad():
        loss = plain(**batch).loss.item()
    assert loss < losses[0] - 0.3


def test_default_job_matches_the_plain_pytorch_path(tmp_path):
    res = train(make_config({"steps": 20, "cpuinfer_threads": THREADS, "output_dir": str(tmp_path), "progress": False}))
    assert res.reference is not None and len(res.reference.losses) == 20
    worst = max(abs(a - b) for a, b in zip(res.ktmoe.losses, res.reference.losses))
    assert worst < CURVE_ATOL, (res.ktmoe.losses, res.reference.losses)
    assert res.speedup is not None and res.speedup > 0
    assert "speed-up" in res.summary()


def test_resume_continues_exactly(tmp_path):
    base = {"steps": 6, "cpuinfer_threads": THREADS, "save_every": 3, "compare": False, "progress": False,
            "batch_size": 4}
    full = train(make_config({**base, "output_dir": str(tmp_path / "a")}))
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "trainer_state.pt").is_file()
    resumed = train(make_config({**base, "output_dir": str(tmp_path / "b"), "resume": str(ckpt)}))
    assert resumed.start_step == 3
    assert resumed.losses == full.losses  # the first 3 come from the checkpoint, the next 3 are recomputed


def test_gradient_checkpointing_job(tmp_path):
    common = {"steps": 3, "cpuinfer_threads": THREADS, "compare": False, "progress": False, "batch_size": 4}
    a = train(make_config({**common, "output_dir": str(tmp_path / "a")}))
    b = train(make_config({**common, "output_dir": str(tmp_path / "b"), "gradient_checkpointing": True}))
    assert a.losses == b.losses


# ------------------------------------------------------------------ a local checkpoint with its own tokenizer

def _save_tiny_checkpoint(path):
    fast = _save_tokenizer(path)
    model = kh.tiny_model("mixtral", seed=0, vocab_size=len(fast))
    model.save_pretrained(path)
    return fast


def _save_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    fast.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
                          "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    fast.save_pretrained(path)
    return fast


def test_local_checkpoint_with_sharegpt_data(tmp_path):
    tok = _save_tiny_checkpoint(tmp_path / "model")
    rows = [{"conversations": [{"from": "human", "value": f"say {w}"}, {"from": "gpt", "value": w},
                               {"from": "human", "value": "again"}, {"from": "gpt", "value": w + " " + w}]}
            for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma")]
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    rc = main(["--model", str(tmp_path / "model"), "--data", str(data), "--steps", "4", "--batch-size", "2",
               "--output-dir", str(out), "--no-progress", "--lora-rank", "2", "--attn-lora-rank", "4",
               "--cpuinfer-threads", str(THREADS)])
    assert rc == 0
    from transformers import AutoModelForCausalLM

    plain = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "model"),
                                           str(out / "adapter"))
    w = kh.peft_expert_wrappers(plain)["model.layers.0.mlp.experts"]
    assert w["gate_up_proj"].r["default"] == 4 and w["down_proj"].r["default"] == 2
    # only assistant turns are trained, with the tokenizer's chat template
    ids, labels = D.tokenize_conversation(tok, D.record_to_messages(rows[0]), 256)
    trained = tok.decode([i for i, l in zip(ids, labels) if l != D.IGNORE_INDEX])
    assert trained == "alpha<|eos|>alpha alpha<|eos|>"


def test_train_model_dir_streams_a_shipped_fp8_deepseek_v3(tmp_path):
    """`python -m ktmoe.train --model DIR` on DeepSeek-V3 as DeepSeek ships it (fp8 experts and attention, several
    shards): loaded through ktmoe.hf.from_pretrained (the experts adopted as fp8, never a float copy), trains."""
    from hf_checkpoints import write_deepseek_v3_fp8

    fast = _save_tokenizer(tmp_path / "tok")
    write_deepseek_v3_fp8(tmp_path / "model", vocab_size=len(fast))
    fast.save_pretrained(tmp_path / "model")
    rows = [{"instruction": f"say {w}", "output": w} for w in ("alpha", "beta", "gamma", "delta")]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ktmoe.train", "--model", str(tmp_path / "model"), "--data",
                           str(data), "--steps", "2", "--batch-size", "2", "--output-dir", str(out),
                           "--method", "AMXFP8_SFT", "--lora-rank", "2", "--cpuinfer-threads", str(THREADS)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ktmoe.from_pretrained" in proc.stderr  # the progress bar over shards
    assert "AMXFP8_SFT" in proc.stdout and "ktmoe.train summary" in proc.stdout
    state = torch.load(out / "checkpoint-2" / "trainer_state.pt", weights_only=False)
    assert len(state["losses"]) == 2 and all(map(math.isfinite, state["losses"]))
    assert (out / "adapter" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------ configuration

def test_bad_configuration_is_reported_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    cases = [
        (["--lora-rank", "0"], "lora_rank"),
        (["--lr-schedule", "cosine2"], "lr_schedule must be one of"),
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--model", str(tmp_path)], "not a local Hugging Face checkpoint"),
        (["--method", "AMXBF16"], "training method"),
        (["--resume", str(tmp_path)], "not a ktmoe checkpoint"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device"))
    for argv, msg in cases:
        assert main(argv + ["--output-dir", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and err.startswith("ktmoe.train: error:"), (argv, err)
    assert not out.exists()


def test_yaml_config_and_flag_precedence(tmp_path):
    pytest.importorskip("yaml")
    f = tmp_path / "job.yaml"
    f.write_text("steps: 7\nlr: 1e-4\nlora_rank: 4\ntarget_modules: [q_proj, v_proj]\ntiny_model:\n  hidden_size: 64\n")
    cfg = load_config(["--config", str(f), "--lora-rank", "2"])
    assert (cfg.steps, cfg.lr, cfg.lora_rank, cfg.target_modules) == (7, 1e-4, 2, ["q_proj", "v_proj"])
    assert cfg.tiny_model["hidden_size"] == 64 and cfg.tiny_model["num_experts"] == 8  # merged into the default
    f.write_text("steps: 7\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option.*learning_rate"):
        load_config(["--config", str(f)])
    f.write_text("steps: seven\n")
    with pytest.raises(ConfigError, match="steps: expected a number"):
        load_config(["--config", str(f)])
    for bad, msg in (("{num_experts_per_tok: 9}", "num_experts_per_tok=9 > num_experts=8"),
                     ("{hiden_size: 64}", "unknown or reserved.*hiden_size"),
                     ("{num_attention_heads: 5}", "not a multiple"), ("[1, 2]", "expected a mapping")):
        f.write_text(f"tiny_model: {bad}\n")
        with pytest.raises(ConfigError, match=msg):
            load_config(["--config", str(f)])
    f.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(["--config", str(f)])


def test_json_config_and_a_clear_message_without_pyyaml(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML missing: a clear message, JSON still works
    f = tmp_path / "job.yaml"
    f.write_text("steps: 7\n")
    with pytest.raises(ConfigError, match="needs PyYAML"):
        load_config(["--config", str(f)])
    j = tmp_path / "job.json"
    j.write_text(json.dumps({"steps": 3, "compare": False, "tiny_model": {"num_experts": 4}}))
    cfg = load_config(["--config", str(j), "--steps", "5"])
    assert (cfg.steps, cfg.compare, cfg.tiny_model["num_experts"]) == (5, False, 4)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "nope.yaml")])


def test_empty_target_modules_flag():
    assert load_config(["--target-modules", ""]).target_modules == []
    assert load_config(["--target-modules", "q_proj,o_proj"]).target_modules == ["q_proj", "o_proj"]


# ------------------------------------------------------------------ data

def test_shipped_dataset_is_package_data_and_deterministic():
    assert os.path.isfile(D.DEFAULT_DATA)
    with open(D.DEFAULT_DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == D.generate_tiny_instructions()
    assert len(rows) >= 300


def test_alpaca_and_sharegpt_files(tmp_path):
    alpaca = [{"instruction": "Add", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello",
                                                                      "system": "Be kind."}]
    sharegpt = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                   {"from": "gpt", "value": "A"}]},
                {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in alpaca))
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in sharegpt) + "\n")
    (tmp_path / "s.json").write_text(json.dumps({"data": sharegpt}))
    a1, a2 = D.load_conversations(str(tmp_path / "a.json")), D.load_conversations(str(tmp_path / "a.jsonl"))
    assert a1 == a2 and a1[0][0] == {"role": "user", "content": "Add\n\n1 2"}
    assert a1[1][0] == {"role": "system", "content": "Be kind."}
    s1, s2 = D.load_conversations(str(tmp_path / "s.jsonl")), D.load_conversations(str(tmp_path / "s.json"))
    assert s1 == s2 and [m["role"] for m in s1[0]] == ["system", "user", "assistant"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="neither alpaca"):
        D.load_conversations(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{oops\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        D.load_conversations(str(tmp_path / "broken.jsonl"))


def test_byte_tokenizer_trains_only_the_response():
    tok = D.ByteTokenizer()
    msgs = D.record_to_messages({"instruction": "Reverse: abc", "output": "cba"})
    ids, labels = D.tokenize_conversation(tok, msgs, 256)
    trained = [i for i, l in zip(ids, labels) if l != D.IGNORE_INDEX]
    assert trained == list(b"cba") + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id and tok.decode(ids).endswith("### Response:\ncba")
    assert D.tokenize_conversation(tok, msgs, 10) is None  # truncated before the response: dropped


def test_batches_are_a_pure_function_of_the_step():
    ds = D.build_dataset(D.ByteTokenizer(), D.load_conversations(D.DEFAULT_DATA), 128)
    b1, b2 = D.Batches(ds, 8, 3), D.Batches(ds, 8, 3)
    for step in (0, 7, 49, 50, 123):
        x, y = b1.batch(step), b2.batch(step)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # an epoch visits every example once
    seen = [i for s in range(b1.steps_per_epoch) for i in b1.indices(s)]
    assert len(set(seen)) == len(seen) == b1.steps_per_epoch * 8
