"""Named numeric tolerances, keyed by the bits of the frozen-weight format (WeightFormat.bits).

All are relative L2 errors, ||kernel - reference|| / ||reference||, over a whole tensor (y, grad_input,
the routing-weight grad, or one of the six LoRA grads). The reference is ktmoe.moe_reference in fp32,
fed exactly the values the kernels see: bf16-rounded hidden states, bf16 (or dequantized) weights and
bf16-rounded LoRA tensors."""

# Kernel vs the fp32 reference run on the weights the kernel effectively uses (WeightFormat.dequantize:
# quantized formats are decoded on the fly to bf16 values, activations stay bf16, so every format is
# held to the bf16 bound). Measured on every ISA level and every shape of test_numerics: 2e-3 .. 8e-3
# (bf16 storage of x, h, the LoRA intermediates and the bf16 output each add ~2^-9 relative rounding;
# accumulation is fp32; the largest values come from T=1, where a tensor has few entries).
REL_L2 = {
    16: 1e-2,   # bf16 weights: the contract says "well under 1e-2"; the worst value seen is printed
    8: 1e-2,    # int8: same bound, the reference runs on the dequantized weights
    4: 1e-2,    # int4 (all four variants): same bound, against the dequantized weights
}

# Kernel vs the fp32 reference run on the ORIGINAL (unquantized) bf16 weights: includes the weight
# quantization error itself, so it is loose for the quantized formats (a check against gross errors
# such as a wrong scale or zero point, not a precision statement). Measured: int8 ~1.3e-2; int4
# per-row 2.0e-1 .. 2.4e-1, int4 K-group 1.5e-1 .. 1.9e-1 (Gaussian weights, 16 levels per row/group).
REL_L2_VS_ORIGINAL = {
    16: 1e-2,   # bf16: no quantization, dequantized == original
    8: 4e-2,    # int8 per-row/group symmetric
    4: 3e-1,    # int4: ~10-15% weight error per projection, compounding over gate/up/down
}
# Formats whose quantization error differs from that of their bit width's integer format, by format name.
# fp8 (e4m3, 3 mantissa bits, one scale per 128 x 128 block): ~2.6% weight error (int8 per row: ~0.7%);
# measured 3.6e-2 .. 5.7e-2 on the output and grad_input over test_numerics' shapes and levels.
REL_L2_VS_ORIGINAL_BY_FORMAT = {
    "fp8": 8e-2,
}

# Same computation through two code paths that should give the same bits or nearly: contiguous vs
# non-contiguous inputs, one chunk vs several (chunked_prefill_size), forward A + B then backward B vs
# B alone, TP threadpool_count=1 vs 2. Chunking and TP change fp32 summation order only.
SAME_PATH_REL_L2 = 1e-5
# Chunking splits the token range: per-token outputs are identical, LoRA grads are summed per chunk
# (fp32 sums in another order): still ~1e-7; TP slices I and reduces the partial down-projections in
# fp32, then rounds to bf16 once: a bf16 ulp can flip on some outputs, hence bf16-ulp slack.
REORDER_REL_L2 = 5e-3

# Training (tests/test_autograd.py toy model, E=8 k=2 H=64 I=32 r=4, T=32, AdamW lr 1e-2, 50 steps).
# With routing decisions shared by the two models (frozen routers reading the model input), the per-step
# relative loss difference between ktmoe and the pure-PyTorch model is measured at 4e-3 .. 8e-3 over six
# seeds (bf16 storage of x, h, LoRA intermediates and outputs; AdamW amplifies it slowly):
LOSS_CURVE_REL = 2e-2
# With trained routers reading their own layer's input, top-k routing flips at near-ties make single
# steps jump: measured over eight seeds, the pure-PyTorch model with only its expert inputs/outputs
# rounded to bf16 jumps up to 2e-1 vs itself unrounded, ktmoe up to 1.8e-1 (mean per-step differences
# 5e-3 .. 3e-2 for both). Widened accordingly, for the one seed the test uses (max ~4e-2, mean ~1e-2):
LOSS_CURVE_SPIKE_REL = 1e-1    # any single step
LOSS_CURVE_MEAN_REL = 3e-2     # mean over the 50 steps, and the mean of the last 10 losses
# The mean loss of the last 10 steps must be below this factor times that of the first 10 (training works;
# measured ~0.5).
LOSS_DECREASE_FACTOR = 0.7

# Resident memory (bytes) allowed to grow over 200 forward/backward steps after warm-up: allocator
# noise only (the layer there saves ~0.5 MiB of activations per forward: a leak of one set per step would
# be ~100 MiB; of a single bf16 [T, H] buffer per step ~6 MiB).
RSS_SLACK_BYTES = 4 * 1024 * 1024


def rel_l2_tol(bits: int) -> float:
    return REL_L2[bits]


def rel_l2_vs_original_tol(bits: int, format_name: str = "") -> float:
    return REL_L2_VS_ORIGINAL_BY_FORMAT.get(format_name, REL_L2_VS_ORIGINAL[bits])

# Hugging Face paths (tests/test_hf_*.py): a converted model (AMXBF16 experts: bf16 activations, fp32
# accumulation) against plain transformers + PEFT in fp32 on the same weights and LoRA values. rel-L2 of the
# logits of tiny models (1-2 MoE layers, vocab 64): measured 1e-4 .. 2e-3; sized for bf16 activation rounding
# (~4e-3 relative per rounding), not for fp32 agreement.
HF_LOGITS_RTOL = 1e-2
# The same model saved by merge_and_unload().save_pretrained() and reloaded in plain transformers (fp32): the
# experts hold exactly what the kernels use plus s*B*A in fp32, so only the bf16 activations differ: same bound.
HF_MERGED_LOGITS_RTOL = 1e-2
# A merged expert weight (ktmoe's export) against PEFT's own merge of the same adapter on the unconverted model:
# both fp32 sums of the same products, in another order.
HF_MERGED_WEIGHT_ATOL = 1e-5
# Sensitivity: dropping the expert LoRA of a model trained a few steps must move the logits by more than this
# factor times HF_LOGITS_RTOL (measured 5x .. 30x on the tiny models with lr 5e-2), so a test that passes with
# the LoRA cannot pass without it.
HF_DROPPED_LORA_FACTOR = 2.0

# ---- W8A8 (activation_quant="int8", tests/test_w8a8.py): the forward's base-weight GEMMs on int8 activations
# (x per token, h per pair) and the int8 codes of per-row int8 / int4 / int4_1 weights; backward unchanged.
# Output vs moe_reference(act_quant="int8") on the weights the int8 products use (dequantize(exact=True)),
# quantizing the same values (x, and h as the kernels store it in bf16): measured 1.3e-3 .. 3.0e-3 on every
# level and shape (the bf16 output rounding, and a rare one-step code difference where the kernel's bf16 h
# and the reference's differ). Quantizing the fp32 h instead, or using the bf16-rounded weights, gives
# 5e-3 .. 1.1e-2 (codes moving across rounding boundaries), about half the quantization effect itself.
W8A8_REL_L2 = 5e-3
# Gradients: the backward is the bf16 one at the W8A8 forward's g, u (straight-through estimator), held to
# REL_L2[bits] against the reference's autograd; measured 6.6e-4 .. 7.1e-3 (the largest at T=1).
# The accuracy cost, output vs the reference without activation quantization on the same dequantized
# weights: measured 1.04e-2 .. 1.57e-2 (all three formats; Gaussian inputs and weights, H 37..768, I 19..384).
# A bound against gross errors, not a precision statement. (Against the original bf16 weights, i.e. W8A8 in
# all: int8 1.2e-2 .. 1.8e-2, int4 1.1e-1 .. 1.9e-1, int4_1 9.5e-2 .. 1.8e-1: within REL_L2_VS_ORIGINAL.)
W8A8_COST_REL_L2 = 3e-2
# The same inputs at every usable level: the int32 products are exact and the fp32 epilogue is one
# expression, so amx-model (tiles) gives exactly the bits of its parent; portable vs avx2 differ by the
# LoRA / activation kernels' fp32 rounding, which can move a bf16 h and so an int8 code: measured 0 .. 1.2e-4.
W8A8_LEVELS_REL_L2 = 1e-3

# FSDP2 / DDP over N gloo ranks vs one process on the combined batch (tests/test_fsdp.py, test_ddp_experts.py):
# the same kernels on each rank's tokens; before any update only fp32 summation order differs (per-rank means
# averaged by the reduce-scatter, the mean of the full batch in one process): the first step's loss, 0 .. 1.2e-7
# relative over 2 ranks. It bounds that step, and pure reorders (expert-parallel outputs and grads, ktmoe's DDP
# helper vs plain DDP over 3 ranks: 2.2e-8, gloo adding the three ranks' values in an order set by a value's
# position in the buffer it reduces; over 2 ranks a + b = b + a, the same bits). It does NOT bound the parameters
# after training steps, not even over 2 ranks: the reordered gradient sums move the next step's activations in
# their last fp32 bits, and now and then one of them crosses a bf16 rounding in the experts' saved values, which
# later steps carry. Which seed hits one is chance: test_fsdp.py's 2-rank run, 3 SGD steps, seeds 11..18 of its
# initial LoRA, worst parameter 2.5e-8 .. 3.8e-8 for most and 1.4e-7 / 5.0e-6 for the others (Zen 3, avx2), and
# a change of the fp32 rounding of one kernel (avx2's LoRA A products, register-blocked vs the generic loop)
# moves which seeds those are (generic: seed 14 2.4e-6, seed 11 3.6e-7). Those runs take DIST_EP_* below.
DIST_REORDER_REL = 1e-6
# `python -m ktmoe.train` under torchrun (2 gloo ranks) vs one process on the same global batch, tiny default
# model, 4 AdamW steps at lr 3e-3 (tests/test_train_torchrun.py). The first step's loss is bit-equal (it precedes
# any update: bounded by DIST_REORDER_REL); after that the fp32 reorder of the gradient sums is amplified by AdamW
# (an update is ~lr * g / sqrt(v): entries with |g| near eps move by O(lr) on a 1e-7 change of g, and lora_B starts
# at zero, so its relative error is large). Measured: losses 1.6e-6 relative, adapter tensors 3.3e-4 relative L2
# (worst tensor). A wrong normalization (per-rank means averaged) changes the step-1 loss by ~1e-2.
DIST_TRAIN_LOSS_REL = 1e-5
DIST_TRAIN_ADAPTER_REL = 3e-3
# The same with every non-expert weight trained (no PEFT: full fine-tuning of attention, router, embeddings next to the
# expert LoRA; SGD lr 0.05, tests/test_ddp_experts.py's "full" case) and 2 micro-batches a step: the first step is a
# pure reorder (1.8e-8), then the experts' bf16 activations turn the fp32 reorder into bf16-ulp differences that the
# full-weight updates carry: measured 2.2e-6 after 2 steps, 3.7e-5 after 3 (worst: the embeddings; loss 3.4e-7) on a
# global batch of 4 rows; 2.3e-5 (loss 3.6e-7) on 12 rows.
# Plain DDP on the same ranks gives the same bits as ktmoe's DDP helper, so this is the reorder, not the reduction.
DIST_FULL_TRAIN_REL = 3e-4
# Expert parallelism (tests/test_expert_parallel.py). One layer over 2 / 3 gloo ranks vs one wrapper holding all
# experts on every rank's tokens: the owner computes the same expert rows in the same order; a token's partial
# sums from different owners are added in fp32 at home. Measured: output and input gradient 0 .. 4.9e-8
# relative L2, routing-weight and LoRA gradients bit-equal: DIST_REORDER_REL applies.
# Training (3 SGD steps, tiny Qwen3-MoE with 8 experts, attention LoRA data-parallel) vs one process on the
# combined batch: with 2 ranks 2.7e-8 (adapter); with 3 ranks the per-rank batch of 2 rows changes attention's
# fp32 results in the last bits, which moves bf16 roundings of the experts' inputs: 1.5e-5 relative L2 (worst
# adapter tensor), the same with plain data parallelism over 3 ranks (1.48e-5); expert parallel vs plain data
# parallel at 3 ranks 1.1e-6. Losses 1.1e-7 .. 8e-7 relative.
# The same bounds serve every data-parallel run over 3 ranks vs one process on the combined batch (tiny Qwen3-MoE,
# 4 experts, 3 SGD steps), and over 2 ranks after the first update (see DIST_REORDER_REL: there a bf16 crossing is
# chance, worst seen 5.0e-6). Splitting the batch in three changes fp32 results in the last bits (per-share attention
# and means, an inexact 1/3), which moves bf16 roundings in the experts, and later steps carry them: one process
# accumulating the gradients of the same three shares is already 5.0e-6 from the unsplit batch (two shares: 2.3e-8),
# and 3 ranks are 1.9e-5 from that one too (the three-way fp32 sums of the reduction, in another order).
# FSDP2 (tests/test_fsdp.py, 6 rows, every parameter sharded unevenly, 2 + 2 + 0 experts): 1.9e-5 (worst tensor:
# attention v_proj lora_A; expert LoRA 6.2e-6, the saved adapter the same), losses 6.6e-7, for reshard and
# checkpointing on and off alike. ktmoe's DDP helper and plain DDP (tests/test_ddp_experts.py, 12 rows, with and
# without accumulation): 1.7e-5 (v_proj lora_A; expert LoRA 4.2e-6), losses 2.7e-7.
DIST_EP_ADAPTER_REL = 1e-4
DIST_EP_LOSS_REL = 1e-5
