"""Per model family: a converted model (routed experts on ktmoe, expert LoRA as six matrices, PEFT LoRA on
attention) against the unconverted transformers model with PEFT `target_parameters` LoRA on the fused expert
tensors (the plain PyTorch path), same weights, same LoRA values.

ktmoe's AMXBF16 method stores the experts in bf16 (the tiny models' expert weights are bf16-representable, so
both sides hold the same numbers) and runs the expert GEMMs on bf16 activations with fp32 accumulation, while the
reference is fp32 throughout: the tolerances below are sized for bf16 activation rounding (~4e-3 relative per
rounding), not for fp32 agreement."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import ktmoe.hf as kh  # noqa: E402
from conftest import THREADS, hf_family_unsupported, rel, tiny  # noqa: E402  (one engine size for the whole suite)
from ktmoe.lora import LORA_NAMES  # noqa: E402

FAMILIES = sorted(kh.families()) + ["deepseek_v2_greedy"]  # every registered family; conftest.TINY_VARIANTS

LOGITS_RTOL = 1e-2   # rel-L2 of the logits (bf16 activations in the experts of 1-2 MoE layers)
LOSS_ATOL = 5e-3     # |loss difference| (cross-entropy near ln(64) ~ 4.2)
GRAD_RTOL = 3e-2     # rel-L2 per gradient tensor (bf16 activations feed every LoRA gradient of the experts)
CURVE_ATOL = 2e-2    # |loss difference| at each of 20 AdamW steps (differences compound through the updates)

R, ALPHA, ATTN_R, ATTN_ALPHA = 4, 8.0, 4, 8.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_pair(family, seed=0, randomize=True):
    """(converted PeftModel, PEFT reference on the unconverted model), equal LoRA values."""
    model = tiny(family, seed=seed)
    ref_base = copy.deepcopy(model)
    kh.convert_model(model, lora_rank=R, lora_alpha=ALPHA, seed=seed, cpuinfer_threads=THREADS)
    pm = kh.add_lora(model, r=ATTN_R, lora_alpha=ATTN_ALPHA)
    if randomize:  # B matrices start at zero; make every LoRA tensor matter
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for _, p in kh.trainable_parameters(pm):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    sd, cfg = kh.adapter_state_dict(pm)
    ref = kh.peft_reference(ref_base, cfg, sd)
    return pm, ref


def tokens(seed, batch=2, seq=12, vocab=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def gradient_pairs(pm, ref):
    """(name, ktmoe gradient in PEFT layout, reference gradient) for every trainable tensor."""
    wrappers = kh.peft_expert_wrappers(ref)
    for name, mod in kh.routed_experts(pm).items():
        # in the installed PEFT's orientation (peft 0.18 swaps A and B of 3-D parameters)
        grads = kh.expert_lora_to_peft({n: p.grad for n, p in zip(LORA_NAMES, mod.lora_parameters)},
                                       swapped=kh.peft_swaps())
        for key in ("gate_up_proj", "down_proj"):
            w = wrappers[name][key]
            yield f"{name}.{key}.lora_A", grads[key][0], w.lora_A["default"].weight.grad
            yield f"{name}.{key}.lora_B", grads[key][1], w.lora_B["default"].weight.grad
    ref_params = dict(ref.named_parameters())
    for n, p in pm.named_parameters():
        if p.requires_grad and ".lora_" in n:  # PEFT's own LoRA (attention)
            yield n, p.grad, ref_params[n].grad


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_every_gradient_match_peft(family):
    pm, ref = make_pair(family, seed=1)
    n_experts = len(kh.routed_experts(pm))
    assert n_experts >= 1 and not any(type(m).__name__ in kh.get_family(pm).experts_classes
                                      for m in kh.base_model_of(pm).modules())
    ids = tokens(2)
    out = pm(input_ids=ids, labels=ids)
    out_ref = ref(input_ids=ids, labels=ids)
    assert rel(out.logits, out_ref.logits) < LOGITS_RTOL
    assert abs(out.loss.item() - out_ref.loss.item()) < LOSS_ATOL
    out.loss.backward()
    out_ref.loss.backward()
    pairs = list(gradient_pairs(pm, ref))
    assert len(pairs) == 4 * n_experts + len([n for n, p in pm.named_parameters() if p.requires_grad and ".lora_" in n])
    attn = 0
    for name, g, g_ref in pairs:
        assert g is not None and g_ref is not None, name
        assert g_ref.norm() > 0, f"{name}: reference gradient is zero (test does not exercise it)"
        assert rel(g, g_ref) < GRAD_RTOL, f"{name}: rel-L2 {rel(g, g_ref):.2e}"
        attn += "self_attn" in name
    assert attn > 0  # attention LoRA was compared too


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_training_steps_follow_the_same_loss_curve(family):
    pm, ref = make_pair(family, seed=3, randomize=False)  # the real start: B = 0
    curves = []
    for model in (pm, ref):
        params = [p for _, p in kh.trainable_parameters(model)]
        opt = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.01)
        losses = []
        for step in range(20):
            ids = tokens(1000 + step % 5)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    kt, plain = curves
    worst = max(abs(a - b) for a, b in zip(kt, plain))
    assert worst < CURVE_ATOL, f"loss curves differ by up to {worst:.4f}:\n{kt}\n{plain}"
    assert sum(kt[-5:]) / 5 < kt[0] - 0.05  # and it learns


@pytest.mark.parametrize("family", FAMILIES)
def test_only_routed_experts_move(family):
    model = tiny(family, seed=0)
    fam = kh.get_family(model)
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    kh.convert_model(model, lora_rank=2, lora_alpha=4, cpuinfer_threads=THREADS)
    after = {n: type(m).__name__ for n, m in model.named_modules()}
    changed = {n for n in before if n in after and before[n] != after[n]}
    assert changed and all(before[n] in fam.experts_classes and after[n] == "KTMoEHFExperts" for n in changed)
    # the original expert tensors are gone from the model; only the six LoRA tensors per layer are new
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".experts." in n}
    assert names == set(LORA_NAMES)
    with pytest.raises(ValueError, match="already converted"):
        kh.convert_model(model, lora_rank=2, lora_alpha=4)


def test_deepseek_v2_group_limited_greedy_is_refused_where_transformers_cannot_route_it():
    reason = hf_family_unsupported("deepseek_v2")
    if reason is None:
        pytest.skip("the installed transformers routes group_limited_greedy (5.24 does)")
    with pytest.raises(ValueError, match=r"deepseek_v2: transformers 5\.\d+\.\d+'s DeepseekV2Moe cannot route "
                                         r"topk_method='group_limited_greedy'.*install a newer transformers"):
        kh.convert_model(kh.tiny_model("deepseek_v2"), lora_rank=R, lora_alpha=ALPHA, cpuinfer_threads=THREADS)
