"""The training loop: build (or load) the model, move its routed experts to ktmoe, LoRA on experts + attention in
one AdamW, deterministic batches, progress bar, checkpoints (PEFT adapter + optimizer state, resumable exactly),
and optionally the same run on the plain PyTorch + PEFT path for comparison."""
from __future__ import annotations

import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import hf
from ..parallel.grads import (clip_grad_norm_, expert_parallel_modules, load_whole_optimizer_state, sync_gradients,
                              whole_optimizer_state)
from . import checkpoint as ckpt_io
from . import distributed as dist_io
from .checkpoint import CheckpointError
from .config import TrainConfig
from .data import DEFAULT_DATA, Batches, ByteTokenizer, Dataset, build_dataset, load_conversations

STATE_FILE = "trainer_state.pt"


@dataclass
class RunStats:
    losses: List[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0          # steps after the first (the first one warms caches and allocators)
    timed_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.timed_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class TrainResult:
    config: TrainConfig
    steps: int
    start_step: int
    ktmoe: RunStats
    reference: Optional[RunStats]
    adapter_dir: str
    checkpoint_dir: str
    description: Dict[str, str]
    is_main: bool = True  # False on ranks other than 0 under torchrun (they neither write nor report)

    @property
    def losses(self) -> List[float]:
        return self.ktmoe.losses

    @property
    def speedup(self) -> Optional[float]:
        if self.reference is None or not self.ktmoe.seconds or not self.reference.seconds:
            return None
        return self.ktmoe.tokens_per_s / self.reference.tokens_per_s

    def summary(self) -> str:
        return format_summary(self)


# ---------------------------------------------------------------- set-up

def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def resolve_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def load_tokenizer(cfg: TrainConfig):
    if cfg.model is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_data(cfg: TrainConfig, tokenizer) -> Dataset:
    return build_dataset(tokenizer, load_conversations(cfg.data or DEFAULT_DATA), cfg.max_seq_len)


@torch.no_grad()
def round_experts_to_bf16(model: torch.nn.Module) -> None:
    """Rounds the routed experts' weights to bf16-representable values (what ktmoe's AMXBF16 method stores), so
    the plain path and ktmoe start from the same numbers."""
    family = hf.get_family(model)
    for n, m in model.named_modules():
        if family.is_experts(n, m):
            for p in (m.gate_up_proj, m.down_proj):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))


def build_base_model(cfg: TrainConfig, tokenizer) -> torch.nn.Module:
    """The unconverted model on the CPU (embedded: random init from cfg.seed, experts bf16-representable)."""
    if cfg.model is None:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        mc = Qwen3MoeConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            **cfg.tiny_model)
        torch.manual_seed(cfg.seed)
        model = Qwen3MoeForCausalLM(mc)
        round_experts_to_bf16(model)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype="auto")
    model.config.use_cache = False
    return model


def load_ktmoe_model(cfg: TrainConfig, dtype: torch.dtype) -> torch.nn.Module:
    """A local checkpoint through ktmoe's streaming loader: the routed experts go from the shards straight into
    the method's packed format (fp8 and compressed-tensors checkpoints as they ship), never as a float copy."""
    model = hf.from_pretrained(cfg.model, method=cfg.method, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                               seed=cfg.seed + 1, cpuinfer_threads=cfg.cpuinfer_threads,
                               threadpool_count=cfg.threadpool_count, dtype=dtype, progress=cfg.progress,
                               expert_parallel=cfg.expert_parallel)
    model.config.use_cache = False
    return model


def setup_ktmoe(cfg: TrainConfig, base: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """Converts `base` in place (unless it was loaded converted, `load_ktmoe_model`), moves the non-expert part to
    device/dtype, adds PEFT LoRA on target_modules."""
    if not hf.routed_experts(base):
        hf.convert_model(base, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, seed=cfg.seed + 1,
                         cpuinfer_threads=cfg.cpuinfer_threads, threadpool_count=cfg.threadpool_count,
                         method=cfg.method, expert_parallel=cfg.expert_parallel)
    base.to(device=device, dtype=dtype)
    torch.manual_seed(cfg.seed + 2)  # PEFT's LoRA init
    model = hf.add_lora(base, r=cfg.resolved_attn_rank, lora_alpha=cfg.resolved_attn_alpha,
                        target_modules=cfg.target_modules)
    if cfg.gradient_checkpointing:
        hf.base_model_of(model).gradient_checkpointing_enable()
    return model


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int):
    params = [p for _, p in hf.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=cfg.resolved_lr, weight_decay=cfg.weight_decay)
    warm = cfg.warmup_steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        prog = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - prog if cfg.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * prog))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---------------------------------------------------------------- progress

class Progress:
    """One stderr line, rewritten in place on a terminal (a line every log_every steps otherwise)."""

    def __init__(self, total: int, label: str, enabled: bool, log_every: int, stream=None):
        self.total, self.label, self.enabled, self.every = total, label, enabled, log_every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tok_s: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step / self.total
        el = time.perf_counter() - self.t0
        eta = el / max(done, 1e-9) - el
        bar = "#" * int(20 * done) + "-" * (20 - int(20 * done))
        line = (f"{self.label} [{bar}] {step}/{self.total} loss {loss:.4f} {tok_s:,.0f} tok/s lr {lr:.2e} "
                f"{el:5.1f}s<{eta:5.1f}s")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or step == 1:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path: str, model, optimizer, scheduler, step: int, stats: RunStats, cfg: TrainConfig,
                    run_id: Optional[str] = None, writes: bool = True) -> None:
    """Writes adapter + trainer state atomically (temporary folder, fsync, manifest, rename: see
    ktmoe.train.checkpoint); a failure leaves earlier checkpoints as they were. Under torchrun every rank calls it
    (expert-parallel blocks and their optimizer state are gathered: the checkpoint holds whole tensors, as one
    process writes them); only the rank with writes=True writes."""
    run_id = run_id or ckpt_io.new_run_id()
    if not writes and not expert_parallel_modules(model):  # nothing to gather: only the writer needs the state
        return
    adapter_sd, adapter_cfg = hf.adapter_state_dict(model)
    opt_state = whole_optimizer_state(optimizer, model)
    if not writes:
        return
    state = {"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict(),
             "param_names": [n for n, _ in hf.trainable_parameters(model)], "losses": list(stats.losses),
             "tokens": stats.tokens, "config": cfg.to_dict(), "run_id": run_id}

    def write(folder: str) -> None:
        try:
            hf.write_adapter(folder, adapter_sd, adapter_cfg)
            torch.save(state, os.path.join(folder, STATE_FILE))
        except RuntimeError as e:  # torch/safetensors report a full disk as a short write
            import shutil

            if shutil.disk_usage(folder).free < (64 << 20) or "space" in str(e).lower():
                raise OSError(28, f"No space left on device ({e})") from None
            raise

    identity = dict(config_hash=ckpt_io.config_hash(cfg.to_dict()), seed=cfg.seed, step=step, run_id=run_id)
    ckpt_io.write_atomic(path, write, identity)


def load_checkpoint(path: str, model, optimizer, scheduler, cfg: Optional[TrainConfig] = None) -> Tuple[int, RunStats]:
    """Verifies (manifest, sizes, hashes, the run's config) and loads a checkpoint; CheckpointError names
    the problem in one line."""
    m = ckpt_io.verify(path, None if cfg is None else cfg.to_dict())
    try:
        state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - EOFError, pickle errors, ...: a file the manifest did not catch
        raise CheckpointError(f"resume: {path}: unreadable {STATE_FILE} ({type(e).__name__}: {e})") from None
    if state.get("run_id") != m.get("run_id") or int(state.get("step", -1)) != m.get("step"):
        raise CheckpointError(f"resume: {path} mixes files of two runs (trainer state of run {state.get('run_id')} "
                              f"step {state.get('step')}, manifest of run {m.get('run_id')} step {m.get('step')})")
    names = [n for n, _ in hf.trainable_parameters(model)]
    if names != state["param_names"]:
        raise CheckpointError(f"resume: {path}: the checkpoint's trainable parameters differ from this model's "
                              f"({len(state['param_names'])} vs {len(names)}): resume with the same model and LoRA "
                              "options")
    try:
        hf.load_adapter(model, path)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends
        raise CheckpointError(f"resume: {path}: unreadable adapter ({type(e).__name__}: {e})") from None
    load_whole_optimizer_state(optimizer, model, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), RunStats(losses=list(state["losses"]), tokens=int(state["tokens"]))


def checkpoint_bytes(model) -> int:
    """About what one checkpoint takes: the trainable parameters, twice the optimizer state, and slack."""
    n = sum(p.numel() * p.element_size() for _, p in hf.trainable_parameters(model))
    return 4 * n + (1 << 20)


# ---------------------------------------------------------------- the loop

def run_steps(model, optimizer, scheduler, batches: Batches, start: int, end: int, device: torch.device,
              cfg: TrainConfig, stats: RunStats, label: str,
              on_step: Optional[Callable[[int], None]] = None,
              dctx: Optional[dist_io.DistContext] = None) -> RunStats:
    """Trains steps [start, end); appends each step's loss to stats. With an active dctx: this rank's rows of
    each global batch, the loss over the global label-token count, gradients summed over ranks; the losses and
    token counts recorded are the global batch's."""
    params = [p for _, p in hf.trainable_parameters(model)]
    ddp = dctx is not None and dctx.active
    model.train()
    prog = Progress(end, label, cfg.progress and (dctx is None or dctx.is_main), cfg.log_every)
    t_timed = None
    for step in range(start, end):
        t_step = time.perf_counter()
        if ddp:
            gb = batches.batch(step)
            ntok = int(gb["attention_mask"].sum())
            b = {k: v.to(device) for k, v in dist_io.shard_rows(gb, dctx.rank, dctx.world_size).items()}
            # sum over this rank's label tokens / the global count: the ranks' losses (and grads) add up to
            # the single-process mean
            out = model(**b, num_items_in_batch=dist_io.label_tokens(gb))
            loss = out.loss
            loss.backward()
            sync_gradients(model, average=False)  # (expert-parallel blocks hold every rank's share already)
            loss = dist_io.all_reduce_sum(loss)
        else:
            b = {k: v.to(device) for k, v in batches.batch(step).items()}
            ntok = int(b["attention_mask"].sum())
            out = model(**b)
            loss = out.loss
            loss.backward()
        if cfg.max_grad_norm > 0:
            clip_grad_norm_(model, params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lv = float(loss.detach())
        if not math.isfinite(lv):
            raise FloatingPointError(f"{label}: loss is {lv} at step {step + 1}")
        stats.losses.append(lv)
        stats.tokens += ntok
        now = time.perf_counter()
        if step > start:  # the first step of a run is warm-up, not timed
            stats.seconds += now - t_step
            stats.timed_tokens += ntok
        tok_s = stats.tokens_per_s if stats.seconds else ntok / max(now - t_step, 1e-9)
        prog.update(step + 1, lv, tok_s, scheduler.get_last_lr()[0])
        if on_step is not None:
            on_step(step + 1)
    prog.close()
    return stats


def describe(cfg: TrainConfig, base, model, data: Dataset, device, dtype) -> Dict[str, str]:
    experts = hf.routed_experts(model)
    first = next(iter(experts.values()))
    family = hf.get_family(hf.base_model_of(model))
    n_exp = sum(m.wrapper.weight_nbytes() for m in experts.values())
    expert_lora = {id(p) for m in experts.values() for p in m.lora_parameters}
    n_all = sum(p.numel() for p in hf.base_model_of(model).parameters() if id(p) not in expert_lora)
    trainable = sum(p.numel() for _, p in hf.trainable_parameters(model))
    try:
        from ..engine import cpu_info

        isa = cpu_info().get("isa_active", "?")
    except Exception:  # noqa: BLE001
        isa = "?"
    mc = hf.base_model_of(model).config
    name = ("embedded tiny Qwen3-MoE (random init)" if cfg.model is None else cfg.model)
    targets = cfg.target_modules if cfg.target_modules is not None else list(family.attention_targets)
    return {
        "model": f"{name}: {family.name}, {mc.num_hidden_layers} layers, H={first.hidden_dim}, "
                 f"{first.num_experts} experts top-{first.wrapper.k}, I={first.intermediate_dim}",
        "placement": f"routed experts of {len(experts)} layers on the CPU via ktmoe ({cfg.method}, {isa}, "
                     f"{n_exp / 2**20:.1f} MiB frozen); the other layers ({n_all / 1e6:.2f}M params) on {device} in "
                     f"{str(dtype).replace('torch.', '')}",
        "data": f"{cfg.data or 'shipped ' + os.path.basename(DEFAULT_DATA)}: {len(data)} examples, "
                f"{data.num_tokens:,} tokens (dropped {data.dropped}); batch {cfg.batch_size}",
        "lora": f"experts r={cfg.lora_rank} alpha={cfg.lora_alpha:g}; "
                + (f"{', '.join(targets)} r={cfg.resolved_attn_rank} alpha={cfg.resolved_attn_alpha:g}; "
                   if targets else "no other modules; ")
                + f"{trainable:,} trainable parameters, one AdamW (lr {cfg.resolved_lr:g}, {cfg.lr_schedule})",
    }


def train(cfg: TrainConfig) -> TrainResult:
    """Runs the job described by cfg (validated already: see config.make_config / load_config). Under torchrun
    (WORLD_SIZE > 1) or inside an initialized process group: data parallel, see ktmoe.train.distributed."""
    threads = cfg.torch_threads or (1 if cfg.model is None else 0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    dctx = dist_io.from_env()
    try:
        return _train(cfg, dctx)
    finally:
        dctx.close()
        torch.set_num_threads(before)


def _train(cfg: TrainConfig, dctx: Optional[dist_io.DistContext] = None) -> TrainResult:
    dctx = dctx or dist_io.DistContext()
    resume_path = None
    if cfg.resume:  # refused before anything is built: incomplete, corrupt, mixed or another run's
        resume_path = ckpt_io.find_latest(cfg.output_dir, cfg.to_dict()) if cfg.resume == "latest" else cfg.resume
        m = ckpt_io.verify(resume_path, cfg.to_dict())
        if cfg.steps and int(m.get("step", 0)) >= cfg.steps:
            raise CheckpointError(f"resume: the checkpoint is at step {m.get('step')}, the run has {cfg.steps} steps")
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    tokenizer = load_tokenizer(cfg)
    data = load_data(cfg, tokenizer)
    batches = Batches(data, cfg.batch_size, cfg.seed)
    total = cfg.resolved_steps(batches.steps_per_epoch)
    compare = cfg.resolved_compare and cfg.resume is None and not dctx.active
    if cfg.expert_parallel and not dctx.active:
        raise CheckpointError("expert_parallel needs more than one process: run under torchrun "
                              "(torchrun --nproc_per_node N -m ktmoe.train --expert-parallel ...)")
    if dctx.active and cfg.batch_size < dctx.world_size:
        raise CheckpointError(f"batch_size {cfg.batch_size} < world size {dctx.world_size}: every rank needs at "
                              "least one row of each global batch; raise --batch-size")

    base = build_base_model(cfg, tokenizer) if cfg.model is None else load_ktmoe_model(cfg, dtype)
    ref_base = copy.deepcopy(base) if compare and cfg.model is None else None
    model = setup_ktmoe(cfg, base, device, dtype)
    init_sd, init_lcfg = hf.adapter_state_dict(model) if compare else (None, None)
    if dctx.active:
        why = dist_io.check_model(hf.base_model_of(model))
        if why:
            raise CheckpointError(f"torchrun: {why}")
    optimizer, scheduler = make_optimizer(cfg, model, total)
    start, stats = 0, RunStats()
    run_id = ckpt_io.new_run_id()
    if cfg.resume:
        start, stats = load_checkpoint(resume_path, model, optimizer, scheduler, cfg)
        run_id = ckpt_io.read_manifest(resume_path).get("run_id") or run_id  # the resumed run keeps its identity
        if start >= total:
            raise CheckpointError(f"resume: the checkpoint is at step {start}, the run has {total} steps")
    # where checkpoints go must be writable and roomy before any training (two checkpoints: old + new)
    # (only rank 0 writes, so only rank 0 probes)
    if dctx.is_main:
        ckpt_io.check_output_dir(cfg.output_dir, 2 * checkpoint_bytes(model))
    desc = describe(cfg, base, model, data, device, dtype)
    if cfg.resume and cfg.compare:
        desc["note"] = "the plain PyTorch comparison runs from step 0 only: skipped when resuming"
    if dctx.active:
        desc["data"] += f", split over {dctx.world_size} ranks (torchrun, gloo)"
        if cfg.expert_parallel:
            pl = next(iter(hf.routed_experts(model).values())).expert_parallel
            desc["data"] += f"; routed experts expert-parallel ({pl.describe()}, ...)"
        if cfg.compare:
            desc["note"] = "the plain PyTorch comparison is single-process only: skipped under torchrun"
    if dctx.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)

    def on_step(step: int) -> None:
        if cfg.save_every and step % cfg.save_every == 0 and step < total:
            save_checkpoint(os.path.join(cfg.output_dir, f"checkpoint-{step}"), model, optimizer, scheduler,
                            step, stats, cfg, run_id, writes=dctx.is_main)
            dctx.barrier()  # no rank runs ahead of a checkpoint it might be asked to resume from

    run_steps(model, optimizer, scheduler, batches, start, total, device, cfg, stats, "ktmoe", on_step, dctx)
    ckpt = os.path.join(cfg.output_dir, f"checkpoint-{total}")
    adapter_dir = os.path.join(cfg.output_dir, "adapter")
    save_checkpoint(ckpt, model, optimizer, scheduler, total, stats, cfg, run_id, writes=dctx.is_main)
    hf.save_adapter(model, adapter_dir)  # (every rank: a collective under expert parallelism; rank 0 writes)
    dctx.barrier()
    del model, base, optimizer, scheduler

    ref_stats = None
    if compare:
        if ref_base is None:
            ref_base = build_base_model(cfg, tokenizer)
        ref_base.to(device=device, dtype=dtype)
        if cfg.gradient_checkpointing:
            ref_base.gradient_checkpointing_enable()
        ref = hf.peft_reference(ref_base, init_lcfg, {k: v.to(device) for k, v in init_sd.items()})
        r_opt, r_sched = make_optimizer(cfg, ref, total)
        ref_stats = run_steps(ref, r_opt, r_sched, batches, 0, total, device, cfg, RunStats(), "plain")
    return TrainResult(cfg, total, start, stats, ref_stats, adapter_dir, ckpt, desc, dctx.is_main)


# ---------------------------------------------------------------- report

def _curve_points(n: int, k: int = 12) -> List[int]:
    if n <= k:
        return list(range(n))
    pts = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return pts


def format_summary(res: TrainResult) -> str:
    s, r = res.ktmoe, res.reference
    lines = ["", "ktmoe.train summary"]
    for k in ("model", "placement", "data", "lora", "note"):
        if k in res.description:
            lines.append(f"  {k:<10} {res.description[k]}")
    first = s.losses[0] if s.losses else float("nan")
    tail = s.losses[-10:] if s.losses else [float("nan")]
    lines.append(f"  {'steps':<10} {res.start_step + 1}..{res.steps}" + (" (resumed)" if res.start_step else "")
                 + f": {s.seconds:.1f} s timed, {s.tokens_per_s:,.0f} tok/s")
    lines.append(f"  {'loss':<10} {first:.4f} (step 1) -> {tail[-1]:.4f} (step {res.steps}); mean of the last "
                 f"{len(tail)}: {sum(tail) / len(tail):.4f}")
    lines.append(f"  {'adapter':<10} {res.adapter_dir} (PEFT format: peft.PeftModel.from_pretrained(model, dir) "
                 "loads it without ktmoe)")
    lines.append(f"  {'checkpoint':<10} {res.checkpoint_dir} (adapter + optimizer; --resume to continue)")
    if r is not None:
        lines.append("")
        lines.append("  loss curve   step      ktmoe   plain PyTorch   |diff|")
        for i in _curve_points(len(s.losses)):
            if i < len(r.losses):
                lines.append(f"             {i + 1:5d}  {s.losses[i]:9.4f}  {r.losses[i]:14.4f}  "
                             f"{abs(s.losses[i] - r.losses[i]):7.4f}")
        n = min(len(s.losses), len(r.losses))
        md = max(abs(a - b) for a, b in zip(s.losses[:n], r.losses[:n])) if n else float("nan")
        lines.append(f"  max |diff| over {n} steps: {md:.4f} (ktmoe computes the experts with bf16 activations)")
        lines.append(f"  plain PyTorch path (transformers experts + PEFT target_parameters LoRA, same init and data): "
                     f"{r.seconds:.1f} s timed, {r.tokens_per_s:,.0f} tok/s")
        lines.append(f"  speed-up   {res.speedup:.2f}x tokens/s, ktmoe over plain PyTorch (steps 2..{res.steps}, "
                     f"same machine and threads)")
    return "\n".join(lines)
