"""The training job: LoRA SFT of a Hugging Face MoE model with its routed experts on ktmoe.

`python -m ktmoe.train` (or `ktmoe-train`) with no arguments trains the embedded default (a tiny Qwen3-MoE on
a shipped instruction set, byte-level tokenizer) and compares it with the plain PyTorch + PEFT path;
`--model DIR --data FILE` trains a local checkpoint. See `ktmoe.train.config.TrainConfig` for every option."""
from .config import ConfigError, TrainConfig, load_config
from .data import ByteTokenizer
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "TrainResult", "ByteTokenizer"]
