"""The training job's configuration: defaults < YAML (or JSON) file < command-line flags, all checked before any
work starts (a bad value is a ConfigError naming the key and what is allowed)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

DEFAULT_TINY_MODEL: Dict[str, Any] = dict(
    # the embedded default: a small Qwen3-MoE, random init, byte-level vocabulary
    num_hidden_layers=2, hidden_size=128, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
    intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32, norm_topk_prob=True,
    max_position_embeddings=512, tie_word_embeddings=False,
)


# any one of these next to config.json lets AutoTokenizer load the checkpoint's tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


class ConfigError(ValueError):
    """A bad training configuration (reported before any work)."""


@dataclass
class TrainConfig:
    # what to train
    model: Optional[str] = None          # local Hugging Face checkpoint folder; None: the embedded tiny Qwen3-MoE
    data: Optional[str] = None           # alpaca / sharegpt .json or .jsonl; None: the shipped tiny instruction set
    output_dir: str = "ktmoe-out"
    tiny_model: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TINY_MODEL))  # embedded model's config
    # schedule
    steps: int = 0                       # 0: 120 for the embedded default, else epochs * steps per epoch
    epochs: float = 1.0
    batch_size: int = 8
    max_seq_len: int = 256
    lr: float = 0.0                      # 0: 3e-3 for the embedded default, 1e-4 otherwise
    lr_schedule: str = "cosine"          # cosine | linear | constant
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    # LoRA
    lora_rank: int = 8                   # expert LoRA rank (as ktmoe counts it: per gate/up/down matrix)
    lora_alpha: float = 16.0
    attn_lora_rank: int = 0              # 0: same as lora_rank
    attn_lora_alpha: float = 0.0         # 0: same as lora_alpha
    target_modules: Optional[List[str]] = None  # PEFT LoRA besides the experts; None: the family's attention; []: none
    # runtime
    device: str = "auto"                 # auto (cuda when there is one) | cpu | cuda | cuda:N: non-expert layers
    dtype: str = "auto"                  # auto (bf16 on cuda, fp32 on cpu) | float32 | bfloat16
    gradient_checkpointing: bool = False
    cpuinfer_threads: Optional[int] = None   # ktmoe engine threads; None: every core this process may use
    torch_threads: int = 0               # PyTorch intra-op threads; 0: 1 for the embedded default (its matrices are
                                         # tiny, and spinning OpenMP threads crawl on a busy machine), else torch's
    threadpool_count: int = 1
    method: str = "AMXBF16_SFT"
    expert_parallel: bool = False        # under torchrun: each rank owns a block of every layer's experts
    # output
    compare: Optional[bool] = None       # also run the plain PyTorch + PEFT path; None: only for the embedded default
    log_every: int = 10
    save_every: int = 0                  # checkpoint (adapter + optimizer) every N steps; 0: only at the end
    resume: Optional[str] = None         # checkpoint folder to resume from
    progress: bool = True

    # ---- derived values
    @property
    def is_default_model(self) -> bool:
        return self.model is None

    def resolved_steps(self, steps_per_epoch: int) -> int:
        if self.steps:
            return self.steps
        if self.is_default_model:
            return 200
        return max(1, int(round(self.epochs * steps_per_epoch)))

    @property
    def resolved_lr(self) -> float:
        return self.lr or (3e-3 if self.is_default_model else 1e-4)

    @property
    def resolved_attn_rank(self) -> int:
        return self.attn_lora_rank or self.lora_rank

    @property
    def resolved_attn_alpha(self) -> float:
        return self.attn_lora_alpha or self.lora_alpha

    @property
    def resolved_compare(self) -> bool:
        return self.is_default_model if self.compare is None else self.compare

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_CHOICES = {"lr_schedule": ("cosine", "linear", "constant"), "dtype": ("auto", "float32", "bfloat16")}
_POSITIVE_INT = ("batch_size", "max_seq_len", "lora_rank", "threadpool_count", "log_every")
_NONNEG_INT = ("steps", "warmup_steps", "attn_lora_rank", "save_every", "seed", "torch_threads")


def _type_name(f) -> str:
    return getattr(f.type, "__name__", str(f.type)).replace("typing.", "")


def _coerce(key: str, value: Any) -> Any:
    """Checks the type of one value (from YAML/JSON or flags)."""
    f = _FIELDS[key]
    t = str(f.type)
    if value is None:
        if "Optional" in t:
            return None
        raise ConfigError(f"{key}: may not be null")
    if "bool" in t:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if "List[str]" in t:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of module names, got {value!r}")
        return list(value)
    if "Dict" in t:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {**DEFAULT_TINY_MODEL, **value} if key == "tiny_model" else dict(value)
    if isinstance(value, str) and ("int" in t or "float" in t) and "str" not in t:
        try:  # YAML 1.1 reads 1e-4 as a string
            value = float(value) if "float" in t else int(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if "int" in t and "float" not in t:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if "float" in t:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if "str" in t:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def read_config_file(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or give the same keys as "
                              "a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def make_config(values: Dict[str, Any], *, check_paths: bool = True) -> TrainConfig:
    """TrainConfig from a mapping (unknown keys, wrong types and bad values raise ConfigError)."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(_FIELDS))}")
    cfg = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(cfg, check_paths=check_paths)
    return cfg


def validate(cfg: TrainConfig, *, check_paths: bool = True) -> None:
    for k in _POSITIVE_INT:
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{k} must be >= 1, got {getattr(cfg, k)}")
    for k in _NONNEG_INT:
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    for k, choices in _CHOICES.items():
        if getattr(cfg, k) not in choices:
            raise ConfigError(f"{k} must be one of {', '.join(choices)}, got {getattr(cfg, k)!r}")
    if not 0 < cfg.lora_rank <= 256:
        raise ConfigError(f"lora_rank must be in 1..256, got {cfg.lora_rank}")
    for k in ("lora_alpha", "epochs"):
        if getattr(cfg, k) <= 0:
            raise ConfigError(f"{k} must be > 0, got {getattr(cfg, k)}")
    for k in ("lr", "attn_lora_alpha", "weight_decay", "max_grad_norm"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.cpuinfer_threads is not None and cfg.cpuinfer_threads < 1:
        raise ConfigError(f"cpuinfer_threads must be >= 1 (or null for all cores), got {cfg.cpuinfer_threads}")
    from ..methods import SFT_METHODS

    if cfg.method not in SFT_METHODS:
        raise ConfigError(f"method must be a training method ({', '.join(sorted(SFT_METHODS))}), got {cfg.method!r}")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"device={dev!r} but no CUDA device is available (use auto or cpu)")
    if cfg.model is None:
        _check_tiny_model(cfg.tiny_model)
    if check_paths:
        if cfg.model is not None:
            if not os.path.isdir(cfg.model) or not os.path.isfile(os.path.join(cfg.model, "config.json")):
                raise ConfigError(f"model: {cfg.model} is not a local Hugging Face checkpoint folder (no config.json)")
            from ..hf.families import families

            try:
                with open(os.path.join(cfg.model, "config.json"), encoding="utf-8") as f:
                    mt = json.load(f).get("model_type")
            except (OSError, json.JSONDecodeError) as e:
                raise ConfigError(f"model: cannot read {cfg.model}/config.json: {e}") from None
            if mt not in families():
                raise ConfigError(f"model: model_type {mt!r} is not supported; supported: "
                                  f"{', '.join(sorted(families()))}")
            if not any(os.path.isfile(os.path.join(cfg.model, f)) for f in TOKENIZER_FILES):
                raise ConfigError(f"model: {cfg.model} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}; "
                                  "vocab.json needs merges.txt next to it): copy the tokenizer of the original "
                                  "checkpoint into that folder (tokenizer.save_pretrained(dir))")
            if (os.path.isfile(os.path.join(cfg.model, "vocab.json")) and not any(
                    os.path.isfile(os.path.join(cfg.model, f)) for f in ("tokenizer.json", "merges.txt"))):
                raise ConfigError(f"model: {cfg.model} has vocab.json but no merges.txt (nor tokenizer.json)")
        if cfg.data is not None:
            if not os.path.isfile(cfg.data):
                raise ConfigError(f"data: {cfg.data}: no such file")
            if not cfg.data.endswith((".json", ".jsonl")):
                raise ConfigError(f"data: {cfg.data}: expected a .json or .jsonl file (alpaca or sharegpt)")
        if cfg.resume not in (None, "latest") and not os.path.isfile(os.path.join(cfg.resume, "trainer_state.pt")):
            raise ConfigError(f"resume: {cfg.resume} is not a ktmoe checkpoint (no trainer_state.pt)")
    if cfg.model is None and cfg.data is None and cfg.max_seq_len < 32:
        raise ConfigError("max_seq_len must be >= 32 for the shipped dataset")


def _check_tiny_model(tm: Dict[str, Any]) -> None:
    from transformers import Qwen3MoeConfig

    known = {f.name for f in dataclasses.fields(Qwen3MoeConfig)} | set(Qwen3MoeConfig.attribute_map) | {"head_dim"}
    bad = sorted(k for k in tm if k not in known or k in ("vocab_size", "pad_token_id", "bos_token_id",
                                                             "eos_token_id"))
    if bad:
        raise ConfigError(f"tiny_model: unknown or reserved Qwen3MoeConfig key(s) {', '.join(bad)} (the vocabulary "
                          "is the byte tokenizer's)")
    try:
        c = Qwen3MoeConfig(**tm)
    except Exception as e:  # noqa: BLE001 - any bad value
        raise ConfigError(f"tiny_model: not a valid Qwen3MoeConfig: {e}") from None
    for k in ("num_hidden_layers", "hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "num_attention_heads", "num_key_value_heads"):
        v = getattr(c, k)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"tiny_model: {k} must be a positive integer, got {v!r}")
    if c.num_experts_per_tok > c.num_experts:
        raise ConfigError(f"tiny_model: num_experts_per_tok={c.num_experts_per_tok} > num_experts={c.num_experts}")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(f"tiny_model: num_attention_heads={c.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads={c.num_key_value_heads}")


# ---------------------------------------------------------------- command line

_HELP = {
    "model": "local Hugging Face checkpoint folder (default: the embedded tiny Qwen3-MoE)",
    "data": "alpaca or sharegpt .json/.jsonl (default: the shipped tiny instruction set)",
    "target_modules": "comma-separated PEFT target modules besides the experts ('' for none)",
    "compare": "also train the plain PyTorch + PEFT path and compare (default: on for the embedded model)",
    "resume": "checkpoint folder (output_dir/checkpoint-N) to resume from, or 'latest': the newest complete one "
              "in --output-dir",
    "steps": "optimizer steps (default: 200 for the embedded model, else epochs x steps per epoch)",
    "lr": "peak learning rate (default: 3e-3 for the embedded model, else 1e-4)",
    "lr_schedule": "cosine (default), linear or constant, after warmup",
    "lora_rank": "expert LoRA rank per gate/up/down matrix (default 8; saved as PEFT rank 2r on gate_up_proj)",
    "attn_lora_rank": "rank of the PEFT LoRA on target_modules (default: lora_rank)",
    "attn_lora_alpha": "alpha of the PEFT LoRA on target_modules (default: lora_alpha)",
    "device": "auto (default: cuda when available), cpu, cuda, cuda:N: where the non-expert layers run",
    "dtype": "auto (default: bf16 on cuda, fp32 on cpu), float32 or bfloat16 for the non-expert layers",
    "cpuinfer_threads": "ktmoe CPU engine threads (default: every core this process may use)",
    "torch_threads": "PyTorch threads (default: 1 for the embedded model, else PyTorch's choice)",
    "save_every": "also checkpoint every N steps (default 0: only at the end)",
    "expert_parallel": "under torchrun: each rank holds and trains only its block of every layer's routed experts, "
                       "tokens are exchanged with all_to_all (default: every rank holds all experts)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ktmoe.train",
        description="LoRA fine-tuning of a Mixture-of-Experts LLM with the routed experts on ktmoe's CPU kernels. "
                    "With no arguments: a tiny Qwen3-MoE on a shipped dataset, compared with plain PyTorch.")
    p.add_argument("--config", help="YAML (or .json) file of options; flags override it")
    for name, f in _FIELDS.items():
        if name == "tiny_model":
            continue
        flag = "--" + name.replace("_", "-")
        t = str(f.type)
        help_ = _HELP.get(name, f"default: {f.default!r}" if f.default is not dataclasses.MISSING else None)
        if "bool" in t:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif "List[str]" in t:
            p.add_argument(flag, dest=name, default=None, help=help_)
        elif "int" in t and "float" not in t:
            p.add_argument(flag, dest=name, type=int, default=None, help=help_)
        elif "float" in t:
            p.add_argument(flag, dest=name, type=float, default=None, help=help_)
        else:
            p.add_argument(flag, dest=name, default=None, help=help_)
    return p


def load_config(argv: Optional[Sequence[str]] = None, *, check_paths: bool = True) -> TrainConfig:
    """Parses flags (and --config); raises ConfigError on anything wrong."""
    args = build_parser().parse_args(argv)
    values: Dict[str, Any] = read_config_file(args.config) if args.config else {}
    for k, v in vars(args).items():
        if k != "config" and v is not None:
            values[k] = v
    return make_config(values, check_paths=check_paths)
