"""Shared fixtures and helpers for the ktmoe test suite.

Every numeric test runs at each ISA level this CPU can run (forced with ktmoe.set_isa, restored after),
and compares against ktmoe.moe_reference, the fp32 per-expert-loop reference, fed the bf16-rounded inputs
the kernels actually see."""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

import ktmoe
from ktmoe.lora import lora_shapes

THREADS = 2  # every wrapper in the suite uses the same engine size (a different one warns)

torch.set_num_threads(THREADS)



def _levels_under_env_cap():
    """The levels this CPU runs, up to $KTMOE_ISA when set (so the cap restricts the suite too), or exactly
    those named in $KTMOE_TEST_LEVELS (comma-separated; the device script runs one level at a time)."""
    levels = ktmoe.available_isa_levels()
    only = [lv.strip() for lv in os.environ.get("KTMOE_TEST_LEVELS", "").split(",") if lv.strip()]
    if only:
        return [lv for lv in only if lv in levels]
    cap = os.environ.get("KTMOE_ISA", "").strip()
    if cap in levels:
        levels = levels[: levels.index(cap) + 1]
    return levels


ISA_LEVELS = _levels_under_env_cap()
SFT_METHODS = sorted(ktmoe.SFT_METHODS)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(params=ISA_LEVELS)
def isa(request):
    """Forces one ISA level for the test; restores the default (best, capped by $KTMOE_ISA) after."""
    used = ktmoe.set_isa(request.param)
    assert used == request.param, f"set_isa({request.param!r}) gave {used!r}"
    assert ktmoe.cpu_info()["isa_active"] == request.param
    yield request.param
    ktmoe.set_isa(None)


@pytest.fixture(params=SFT_METHODS)
def sft_method(request):
    return request.param


# ------------------------------------------------------------------------------- recording of errors
# The measured errors are kept here and printed at the end of the run, so a tolerance that passes with
# little margin is visible (the bf16 contract is "well under 1e-2", not "just under").
_RECORDED: Dict[Tuple[str, str], float] = defaultdict(float)


def record(group: str, what: str, value: float) -> None:
    key = (group, what)
    _RECORDED[key] = max(_RECORDED[key], value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _RECORDED:
        return
    terminalreporter.section("ktmoe: worst relative L2 error seen (per group and tensor)")
    for (group, what), v in sorted(_RECORDED.items()):
        terminalreporter.write_line(f"{group:<32s} {what:<14s} {v:.3e}")


# tiny-model cases besides the families' own: DeepSeek-V2 with V2-Lite's greedy routing, which transformers 5.6
# runs (not the tiny config's group_limited_greedy), so that the family is tested at both ends of the range
TINY_VARIANTS = {"deepseek_v2_greedy": ("deepseek_v2", {"topk_method": "greedy"})}


def tiny(case: str, **kwargs):
    """kh.tiny_model of a family or of a TINY_VARIANTS case."""
    import ktmoe.hf as kh

    family, over = TINY_VARIANTS.get(case, (case, {}))
    return kh.tiny_model(family, **{**over, **kwargs})


def hf_family_unsupported(case: str, **overrides) -> Optional[str]:
    """Why the installed transformers cannot run this family's (or TINY_VARIANTS case's) tiny model (ktmoe's own
    check, the message convert_model would raise), or None."""
    import ktmoe.hf as kh
    from transformers import AutoConfig

    family, over = TINY_VARIANTS.get(case, (case, {}))
    overrides = {**over, **overrides}
    fam = kh.families()[family]
    try:
        fam.check_config(AutoConfig.for_model(fam.name, **{**fam.tiny, **overrides}))
    except ValueError as e:
        return str(e)
    return None


@pytest.fixture(autouse=True)
def _skip_family_the_installed_transformers_cannot_run(request):
    """A tests/test_hf_* test parametrized by `family` is skipped, with ktmoe's reason, where the installed
    transformers cannot run that family's tiny model (transformers 5.6 and DeepSeek-V2's group_limited_greedy)."""
    if not request.module.__name__.startswith("test_hf_"):  # others name their own configs by family
        return
    callspec = getattr(request.node, "callspec", None)
    family = callspec.params.get("family") if callspec is not None else None
    if isinstance(family, str):
        reason = hf_family_unsupported(family)
        if reason:
            pytest.skip(reason)


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch on one thread for a module of tiny models: as fast, and immune to OpenMP spinning on a
    busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bf16_round(t: torch.Tensor) -> torch.Tensor:
    """The fp32 tensor holding the values `t` has once stored as bf16."""
    return t.to(torch.bfloat16).float()


def make_expert_weights(E: int, H: int, I: int, g: torch.Generator, dtype=torch.bfloat16):
    """gate, up [E, I, H] and down [E, H, I], bf16-representable, scale 1/sqrt(fan_in)."""
    gate = torch.randn(E, I, H, generator=g) / math.sqrt(H)
    up = torch.randn(E, I, H, generator=g) / math.sqrt(H)
    down = torch.randn(E, H, I, generator=g) / math.sqrt(I)
    return tuple(t.to(torch.bfloat16).to(dtype) for t in (gate, up, down))


def make_lora(E: int, H: int, I: int, r: int, g: torch.Generator, scale: float = 0.1) -> Dict[str, torch.Tensor]:
    """The six LoRA tensors, fp32 holding bf16-representable values, entries ~ scale * N(0, 1).

    Both A and B are nonzero (unlike PEFT's B = 0 start), so every LoRA term and gradient matters."""
    return {n: bf16_round(torch.randn(s, generator=g) * scale) for n, s in lora_shapes(E, H, I, r).items()}


def make_x(T: int, H: int, g: torch.Generator, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.randn(T, H, generator=g).to(torch.bfloat16).to(dtype)


def make_ids(T: int, E: int, k: int, g: torch.Generator, *, pool: Optional[Sequence[int]] = None,
             skip_frac: float = 0.0, all_skipped_rows: Sequence[int] = (), always: Optional[int] = None,
             dtype=torch.int64) -> torch.Tensor:
    """[T, k] expert ids, distinct experts per token (randperm), from `pool` (default: all E).

    skip_frac: fraction of slots set to -1; all_skipped_rows: tokens whose every slot is -1;
    always: an expert put in slot 0 of every token (to give one expert many rows)."""
    pool_t = torch.arange(E) if pool is None else torch.tensor(list(pool))
    assert k <= len(pool_t)
    rows = []
    for _ in range(T):
        if always is not None:
            rest = pool_t[pool_t != always]
            rest = rest[torch.randperm(len(rest), generator=g)[: k - 1]]
            rows.append(torch.cat([torch.tensor([always]), rest]))
        else:
            rows.append(pool_t[torch.randperm(len(pool_t), generator=g)[:k]])
    ids = torch.stack(rows) if T > 0 else torch.empty(0, k, dtype=torch.int64)
    if skip_frac > 0:
        ids[torch.rand(T, k, generator=g) < skip_frac] = -1
    for t in all_skipped_rows:
        ids[t] = -1
    return ids.to(dtype)


def make_routing_weights(T: int, k: int, g: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """Positive routing weights summing to 1 per token (softmax), as a top-k router gives."""
    w = torch.softmax(torch.randn(T, k, generator=g), dim=-1)
    return w.to(dtype)


def make_wrapper(E: int, k: int, H: int, I: int, r: int, *, alpha: Optional[float] = None,
                 method: str = "AMXBF16_SFT", mode: str = "sft", weights=None, lora=None, **kwargs):
    """A loaded wrapper (cpuinfer_threads=THREADS); LoRA bound when given."""
    w = ktmoe.KTMoEWrapper(mode=mode, method=method, layer_idx=0, num_experts=E, num_experts_per_tok=k,
                           hidden_size=H, moe_intermediate_size=I, lora_rank=r,
                           lora_alpha=float(alpha if alpha is not None else 2 * max(r, 1)),
                           cpuinfer_threads=kwargs.pop("cpuinfer_threads", THREADS), **kwargs)
    if weights is not None:
        w.load_weights_from_tensors(*weights)
    if lora is not None:
        w.init_lora_weights(*(lora[n] for n in ktmoe.LORA_NAMES))
    return w


def randomized_lora_model(family: str, seed: int, *, dtype=None, **convert):
    """A tiny transformers model of `family` converted to ktmoe experts (r=4, alpha=8) with PEFT LoRA on
    the experts and attention, every trainable tensor set to random values (as if trained)."""
    import ktmoe.hf as kh

    model = tiny(family, seed=seed)
    if dtype is not None:
        model.to(dtype)
    kh.convert_model(model, lora_rank=4, lora_alpha=8.0, seed=seed, cpuinfer_threads=THREADS, **convert)
    pm = kh.add_lora(model, r=4, lora_alpha=8.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in kh.trainable_parameters(pm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pm


def reference(x, ids, rw, weights, lora, scaling, dy=None, act_quant=None):
    """fp32 reference output and (with dy) gradients: (y, dx, dw, {lora name: grad}).

    Every input goes in as fp32 after bf16 rounding where the kernels store bf16 (x, weights, LoRA);
    routing weights go in as given (fp32, or bf16 widened). act_quant: moe_reference's (W8A8)."""
    x = bf16_round(x.detach()).requires_grad_(dy is not None)
    rw = rw.detach().float().requires_grad_(dy is not None)
    ws = [t.detach().float() for t in weights]
    lo = None
    if lora is not None:
        lo = {n: bf16_round(t.detach()).requires_grad_(dy is not None) for n, t in lora.items()}
    y = ktmoe.moe_reference(x, ids, rw, *ws, lo, scaling, act_quant=act_quant)
    if dy is None:
        return y.detach(), None, None, None
    if y.requires_grad:  # not when every slot is -1: then nothing depends on the inputs
        y.backward(dy.float())
    grads = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in (lo or {}).items()}
    dx = x.grad if x.grad is not None else torch.zeros_like(x)
    dw = rw.grad if rw.grad is not None else torch.zeros_like(rw)
    return y.detach(), dx, dw, grads


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in the tensors' dtype, with a tiny floor on the denominator."""
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64; 0 when both are zero, inf when only expected is."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} vs expected {tuple(e.shape)}"
    num = torch.linalg.vector_norm(a - e).item()
    den = torch.linalg.vector_norm(e).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def assert_close_rel(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float,
                     group: str = "") -> float:
    assert torch.isfinite(actual.float()).all(), f"{name}: non-finite values in the result"
    err = rel_l2(actual, expected)
    if group:
        record(group, name, err)
    assert err < tol, f"{name}: rel-L2 {err:.3e} >= {tol:.1e} (|expected| = {expected.double().norm():.3e})"
    return err
