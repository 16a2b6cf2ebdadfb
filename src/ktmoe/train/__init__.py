"""The training job: LoRA SFT of a Hugging Face MoE model with its routed experts on ktmoe.

`python -m ktmoe.train` (or `ktmoe-train`) with no arguments trains the embedded default (a tiny Qwen3-MoE on
a shipped instruction set, byte-level tokenizer) and compares it with the plain PyTorch + PEFT path;
`--model DIR --data FILE` trains a local checkpoint. See `ktmoe.train.config.TrainConfig` for every option.

Options come from defaults < a YAML (or JSON) file given with --config < flags; every key is checked before
any work starts. Example job.yaml:

    model: /models/Qwen3-30B-A3B          # a local Hugging Face checkpoint (its own tokenizer)
    data: /data/chat.jsonl                # alpaca {instruction, input, output} or sharegpt {conversations}
    output_dir: runs/qwen3
    epochs: 1
    batch_size: 4
    max_seq_len: 2048
    lr: 1.0e-4
    lora_rank: 8                          # experts: per gate/up/down matrix
    lora_alpha: 16
    target_modules: [q_proj, k_proj, v_proj, o_proj]   # PEFT LoRA next to the experts ([] for none)
    gradient_checkpointing: true
    save_every: 500                       # checkpoint-N/: PEFT adapter + optimizer state (--resume)

The result: output_dir/adapter (PEFT format; `peft.PeftModel.from_pretrained(model, dir)` loads it without
ktmoe, `ktmoe.hf.from_adapter(model, dir)` loads it back into ktmoe) and output_dir/checkpoint-N."""
from .config import ConfigError, TrainConfig, load_config
from .data import ByteTokenizer
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "ConfigError", "load_config", "train", "TrainResult", "ByteTokenizer"]
