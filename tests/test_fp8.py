"""The fp8 format (AMXFP8_SFT / AMXFP8): float8 e4m3 weights with fp32 2-D block scales, as DeepSeek-V3
ships them, and the adoption of shipped codes and scales (fp8 blocks, compressed-tensors int4).

- forward and every gradient against the fp32 reference on the dequantized weights, at every level, for
  sizes that are not multiples of the block (partial edge blocks; backward NN blocks cross block rows),
  with DeepSeek's 128 x 128 blocks and a 64-row x 32-column block;
- adopted weights dequantize to exactly the checkpoint's own math (torch.equal): DeepSeek's fp8 -> fp32,
  times scale_inv in fp32, cast to bf16; compressed-tensors' value * scale in the scale's dtype (bf16);
- a shipped format converted into another method's format, and the refusals."""
from __future__ import annotations

import warnings

import pytest
import torch

import ktmoe
from conftest import (assert_close_rel, gen, make_expert_weights, make_ids, make_lora, make_routing_weights,
                      make_wrapper, make_x, reference)
from ktmoe.formats import FORMATS, Packed, compressed_tensors
from ktmoe.formats.fp8 import FP8Format
from tolerances import rel_l2_tol, rel_l2_vs_original_tol

FP8 = FORMATS["fp8"]
BLOCKS = [(128, 128), (64, 32)]  # (rows, cols) per scale: DeepSeek's, and a non-square one


def ceil_div(a, b):
    return -(-a // b)


def shipped_fp8(E, R, C, block, g):
    """A checkpoint's fp8 tensors: random e4m3 bytes over the whole code range (subnormals, both signs, the
    extremes; NaN codes replaced) and fp32 scale_inv per block, as float8_e4m3fn + float32."""
    codes = torch.randint(0, 256, (E, R, C), generator=g, dtype=torch.int64).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 1
    scale = torch.rand(E, ceil_div(R, block[0]), ceil_div(C, block[1]), generator=g) * 1e-3 + 1e-5
    return codes.view(torch.float8_e4m3fn), scale


def deepseek_dequant(weight, scale_inv, block):
    """DeepSeek's dequantization written out here on its own: fp8 -> fp32, times the block's fp32 scale_inv,
    cast to bf16 (round to nearest even)."""
    R, C = weight.shape[-2:]
    s = scale_inv.repeat_interleave(block[0], -2)[..., :R, :].repeat_interleave(block[1], -1)[..., :C]
    return (weight.to(torch.float32) * s).to(torch.bfloat16)


def ct_pack(values):
    """Signed int4 values [..., out, in] packed the compressed-tensors way: value + 8, eight per int32, low
    nibble first, the last word zero-padded."""
    *lead, R, C = values.shape
    words = ceil_div(C, 8)
    u = torch.zeros(*lead, R, words * 8, dtype=torch.int32)
    u[..., :C] = values.to(torch.int32) + 8
    u = u.reshape(*lead, R, words, 8)
    return (u << (torch.arange(8, dtype=torch.int32) * 4)).sum(-1, dtype=torch.int32)


def run_layer(wr, E, k, H, I, r, T, seed):
    g = gen(seed + 100)
    lora = make_lora(E, H, I, r, g)
    wr.init_lora_weights(*(lora[n] for n in ktmoe.LORA_NAMES))
    x, ids, rw, dy = make_x(T, H, g), make_ids(T, E, k, g), make_routing_weights(T, k, g), make_x(T, H, g)
    y = wr.forward_sft(x, ids, rw)
    dx, grads = wr.backward(dy)
    yr, dxr, dwr, gr = reference(x, ids, rw, wr.dequantized_weights(), lora, wr.lora_scale, dy)
    run_layer.inputs = (x, ids, rw, lora)  # for a second reference on other weights
    return (y, dx, grads), (yr, dxr, dwr, gr)


def check_all(got, want, tol, group):
    (y, dx, grads), (yr, dxr, dwr, gr) = got, want
    assert_close_rel("y", y, yr, tol, group)
    assert_close_rel("grad_input", dx, dxr, tol, group)
    assert_close_rel("weights_grad", grads["weights"], dwr, tol, group)
    for n in ktmoe.LORA_NAMES:
        assert_close_rel(n, grads[n], gr[n], tol, group)


# ---------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("parts", [1, 2], ids=["P1", "P2"])
def test_fp8_forward_and_gradients(isa, block, parts):
    """H=200, I=136: partial blocks at both edges; down's NN blocks (K = H rows) cross the block-row
    boundary. P=2: each part's view starts at column/row 68, inside a block."""
    E, k, H, I, r, T = 5, 2, 200, 136, 4, 40
    weights = make_expert_weights(E, H, I, gen(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a second engine (P=2) beside the P=1 one
        wr = make_wrapper(E, k, H, I, r, method="AMXFP8_SFT", threadpool_count=parts)
    if block == FP8.block_size:
        wr.load_weights_from_tensors(*weights)
    else:
        wr.load_packed_weights(*(FP8.pack(w.float(), block_size=block) for w in weights))
    for p, w in zip(wr._weights, weights):
        assert (p.block_rows, p.group) == block and p.data.dtype == torch.uint8
    got, want = run_layer(wr, E, k, H, I, r, T, seed=2)
    check_all(got, want, rel_l2_tol(8), f"AMXFP8_SFT/{block[0]}x{block[1]}/{isa}")
    # loosely against the unquantized weights (the e4m3 rounding itself)
    x, ids, rw, lora = run_layer.inputs
    y_orig, _, _, _ = reference(x, ids, rw, weights, lora, wr.lora_scale)
    assert_close_rel("y_vs_original", got[0], y_orig, rel_l2_vs_original_tol(8, "fp8"), "AMXFP8_SFT/vs-original")


def test_fp8_inference_method():
    E, k, H, I = 3, 2, 72, 40
    weights = make_expert_weights(E, H, I, gen(3))
    wi = make_wrapper(E, k, H, I, 0, method="AMXFP8", mode="inference", weights=weights)
    ws = make_wrapper(E, k, H, I, 0, method="AMXFP8_SFT", weights=weights)
    g = gen(4)
    x, ids, rw = make_x(7, H, g), make_ids(7, E, k, g), make_routing_weights(7, k, g)
    assert torch.equal(wi.forward(x, ids, rw), ws.forward_sft(x, ids, rw, save_for_backward=False))


def test_fp8_pack_from_float():
    """pack(): scale = max |w| / 448 per block (1 for a zero block); dequantized within e4m3's precision."""
    w = torch.randn(2, 200, 136, generator=gen(5))
    w[1, :64, :32] = 0
    p = FORMATS["fp8"].pack(w, block_size=(64, 32))
    assert p.scale.shape == (2, 4, 5)
    amax = w[0, 128:192, 128:136].abs().max()
    assert p.scale[0, 2, 4] == amax / 448
    assert p.scale[1, 0, 0] == 1.0 and (p.data[1, :64, :32] == 0).all()
    d = FP8.dequantize(p)
    assert float((d - w).norm() / w.norm()) < 4e-2  # 3 mantissa bits: ~2.6%


# ------------------------------------------------------------------------------------- adoption, exact
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_fp8_adopted_weights_equal_the_checkpoint_math(block):
    E, H, I = 3, 200, 136
    g = gen(6)
    shipped = [shipped_fp8(E, R, C, block, g) for R, C in ((I, H), (I, H), (H, I))]
    wr = make_wrapper(E, 2, H, I, 4, method="AMXFP8_SFT")
    wr.load_packed_weights(*(FP8.adopt(w, s, block) for w, s in shipped))
    for (w, s), got in zip(shipped, wr.dequantized_weights()):
        assert torch.equal(got, deepseek_dequant(w, s, block).float())
    # bit for bit the shipped bytes and scales, nothing requantized
    for (w, s), p in zip(shipped, wr._weights):
        assert torch.equal(p.data, w.view(torch.uint8)) and torch.equal(p.scale, s)
    # every e4m3 code's value, compared with torch's own float8 conversion, in one expert row
    codes = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0
    p = FP8.adopt(codes.view(torch.float8_e4m3fn).reshape(1, 1, 256), torch.ones(1, 1, 2))
    assert torch.equal(FP8.dequantize(p, exact=True)[0, 0], codes.view(torch.float8_e4m3fn).float())
    # and the kernels compute with them: forward + gradients within the bf16 bound
    got, want = run_layer(wr, E, 2, H, I, 4, 30, seed=7)
    check_all(got, want, rel_l2_tol(8), "AMXFP8_SFT/adopted")


def test_compressed_tensors_int4_adopted_exactly():
    """pack-quantized int4, symmetric, group 32, bf16 scales -> int4_kgroup with group 32 (the wrapper's
    group_size=128 does not matter): dequantized_weights() equals value * scale in bf16."""
    E, H, I = 4, 96, 64
    g = gen(8)
    shipped = []
    for R, C in ((I, H), (I, H), (H, I)):
        values = torch.randint(-8, 8, (E, R, C), generator=g, dtype=torch.int64).to(torch.int8)
        scale = (torch.rand(E, R, C // 32, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
        shipped.append((ct_pack(values), scale, (R, C), values))
    for words, _, shape, values in shipped:
        assert torch.equal(compressed_tensors.unpack_int4(words, shape), values)
    wr = make_wrapper(E, 2, H, I, 4, method="AMXINT4_KGroup_SFT")
    wr.load_packed_weights(*(compressed_tensors.adopt_pack_quantized(w, s, shape) for w, s, shape, _ in shipped))
    for (words, scale, shape, values), got, p in zip(shipped, wr.dequantized_weights(), wr._weights):
        assert p.group == 32
        ct_math = values.to(scale.dtype) * scale.repeat_interleave(32, -1)  # the checkpoint's own dequantization
        assert torch.equal(got, ct_math.float())
        assert torch.equal(got, compressed_tensors.dequantize_pack_quantized(words, scale, shape).float())
    got, want = run_layer(wr, E, 2, H, I, 4, 30, seed=9)
    check_all(got, want, rel_l2_tol(4), "AMXINT4_KGroup_SFT/adopted")


def test_compressed_tensors_partial_last_word():
    """in = 36: the last int32 holds 4 codes and 4 zero nibbles of padding."""
    values = torch.randint(-8, 8, (3, 36), generator=gen(10), dtype=torch.int64).to(torch.int8)
    words = ct_pack(values)
    assert words.shape == (3, 5)
    assert torch.equal(compressed_tensors.unpack_int4(words, torch.tensor([3, 36])), values)


# --------------------------------------------------------------------------- conversion and refusals
def test_fp8_checkpoint_into_int4_method():
    """An FP8 checkpoint into AMXINT4_SFT: converted from the dequantized values."""
    E, H, I = 3, 64, 48
    g = gen(11)
    weights = make_expert_weights(E, H, I, g)
    adopted = [FP8.pack(w.float()) for w in weights]
    wr = make_wrapper(E, 2, H, I, 4, method="AMXINT4_SFT")
    wr.load_packed_weights(*adopted, source_format="fp8")
    want = [FORMATS["int4"].dequantize(FORMATS["int4"].pack(FP8.dequantize(p))) for p in adopted]
    for a, b in zip(wr.dequantized_weights(), want):
        assert torch.equal(a, b)
    got, ref = run_layer(wr, E, 2, H, I, 4, 20, seed=12)
    check_all(got, ref, rel_l2_tol(4), "AMXINT4_SFT/from-fp8")


def test_adoption_refusals():
    E, H, I = 2, 37, 24
    g = gen(13)
    adopted = [FP8.pack(w.float()) for w in make_expert_weights(E, H, I, g)]
    wr = make_wrapper(E, 2, H, I, 4, method="AMXINT4_SFT")
    with pytest.raises(ValueError, match="source_format='fp8' -> method AMXINT4_SFT.*gate.*must be even"):
        wr.load_packed_weights(*adopted, source_format="fp8")
    with pytest.raises(ValueError, match="source_format='fp4' is not a known weight format"):
        wr.load_packed_weights(*adopted, source_format="fp4")
    with pytest.raises(ValueError, match="gate: int4 packs scale blocks of 1 row"):
        wr.load_packed_weights(*adopted)  # int4 tensors expected, fp8 given
    w8 = make_wrapper(E, 2, H, I, 4, method="AMXFP8_SFT")
    with pytest.raises(ValueError, match=r"down: packed shape \(2, 24, 37\), expected \(2, 37, 24\)"):
        w8.load_packed_weights(adopted[0], adopted[1], adopted[0])
    w, s = shipped_fp8(E, I, H, (128, 128), g)
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(2, 1, 1\), but 64 x 32 blocks"):
        FP8.adopt(w, s, (64, 32))
    bad = s.clone()
    bad[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight_scale_inv holds non-finite values"):
        FP8.adopt(w, bad)
    nan = w.view(torch.uint8).clone()
    nan[1, 3, 5] = 0xFF
    with pytest.raises(ValueError, match=r"weight holds a NaN float8 code at index \(1, 3, 5\)"):
        FP8.adopt(nan, s)
    with pytest.raises(ValueError, match="weight must be float8_e4m3fn"):
        FP8.adopt(w.float(), s)
    with pytest.raises(ValueError, match="block_size must be two positive ints"):
        FP8.adopt(w, s, (0, 128))
    with pytest.raises(ValueError, match="weight_packed has shape"):
        compressed_tensors.adopt_pack_quantized(torch.zeros(4, 3, dtype=torch.int32), torch.ones(4, 1), (4, 32))
    with pytest.raises(ValueError, match=r"int4_kgroup codes lie in \[-8, 7\]"):
        FORMATS["int4_kgroup"].adopt(torch.full((1, 2, 32), 9, dtype=torch.int8), torch.ones(1, 2, 1))
    assert w8._weights is None  # nothing was bound by the refused loads


def test_fp8_weight_folder_round_trip(tmp_path):
    """A 64 x 32-block fp8 layer written by write_layer is read back by load_weights bit for bit; the
    manifest records the block."""
    from ktmoe.weights_io import read_manifest, write_layer

    E, H, I = 3, 72, 40
    g = gen(14)
    packed = [FP8.adopt(*shipped_fp8(E, R, C, (64, 32), g), (64, 32)) for R, C in ((I, H), (I, H), (H, I))]
    write_layer(tmp_path, 0, FP8, packed, method="AMXFP8_SFT")
    assert read_manifest(tmp_path)["block_size"] == [64, 32]
    wr = make_wrapper(E, 2, H, I, 0, method="AMXFP8_SFT", weight_path=str(tmp_path))
    wr.load_weights()
    for a, b in zip(wr._weights, packed):
        assert torch.equal(a.data, b.data) and torch.equal(a.scale, b.scale) and (a.block_rows, a.group) == (64, 32)
    with pytest.raises(ValueError, match="differ from fp8's"):
        write_layer(tmp_path, 1, FP8, [packed[0], packed[1], FP8.pack(torch.zeros(E, H, I))])


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"b{b[0]}x{b[1]}")
def test_fp8_node_local_slices_keep_the_values(block):
    """A TP slice starting inside a scale block (i0 = 48, 68) gets gcd-sized blocks holding the same scales:
    its dequantized weights are exactly the full matrix's slice."""
    p = FP8.pack(torch.randn(2, 136, 200, generator=gen(15)), block_size=block)
    q = FP8.pack(torch.randn(2, 200, 136, generator=gen(16)), block_size=block)
    full_p, full_q = FP8.dequantize(p), FP8.dequantize(q)
    ident = lambda t: t.contiguous()  # noqa: E731
    for i0, i1 in ((0, 68), (68, 136), (48, 96), (96, 136)):
        s = FP8.part_slice(p, "gate", i0, i1, ident)
        assert torch.equal(FP8.dequantize(s), full_p[:, i0:i1, :])
        d = FP8.part_slice(q, "down", i0, i1, ident)
        assert torch.equal(FP8.dequantize(d), full_q[:, :, i0:i1])
