"""Slot conformance: every usable ISA level's slots against the reference slots (src/ktmoe/kernels/ref/),
with every operand ending at a guard page (a read or write past the end would fault) and C padding that
must stay untouched. A broken kernel shows here as "slot X wrong at (M, N, K)", not only as a layer error.

The tolerance of the GEMM slots is 1e-5 of sum_k |a_k b_k| (fp32 accumulation of bf16 products in any
order stays far inside it); decode slots must match bit for bit; the activation slots are held to the bf16
rounding of their saved outputs (see core/conformance.c). The W8A8 slots: the activation quantizer must
match its definition bit for bit (codes and scale), the int8 product the int64 dot products scaled in
double to 1e-6 of sa (|sw| sum |aq q| + |zw| sum |aq|) (an fp32 epilogue of three roundings)."""
from __future__ import annotations

import pytest

import ktmoe
from ktmoe import _core

LEVELS = ktmoe.available_isa_levels()  # every level this machine runs, whatever $KTMOE_ISA says
FORMATS = list(_core.WEIGHT_FORMATS)

GEMM_SHAPES = [(1, 1, 1), (1, 7, 0), (3, 5, 17), (4, 4, 32), (5, 17, 33), (6, 64, 64), (7, 65, 95),
               (13, 31, 130), (16, 16, 2048), (9, 70, 767), (2, 129, 2), (12, 3, 1537)]
# (M, N, K) of the prepared-operand path: fewer rows than a tile level's crossover, tile edges, a row count
# past one GEMM chunk (blk.mc), odd K (int4 needs even columns of storage, not of the block)
BOP_SHAPES = [(1, 5, 64), (3, 33, 40), (8, 16, 32), (17, 48, 100), (40, 70, 130), (200, 37, 66), (16, 129, 31),
              (23, 64, 301), (64, 200, 600),
              (41, 64, 2048), (130, 300, 257), (2, 9, 96), (4, 70, 320)]
OUTER_SHAPES = [(1, 1, 1), (5, 3, 31), (17, 4, 64), (40, 16, 100), (3, 33, 257), (16, 64, 256), (64, 16, 130)]
ACT_SIZES = [1, 31, 256]
# The W8A8 product (M, N, K): fewer rows than a tile level's crossover (blk.pack_min_m = 8) and exactly it,
# tile edges in N (16, 32, 33, 65), K off the 64-wide int8 tile rows (1, 40, 66, 100, 130, 193), and row counts
# past one GEMM chunk (blk.mc = 128)
Q8_FORMATS = ["int8", "int4", "int4_1"]
Q8_SHAPES = [(1, 5, 64), (3, 33, 40), (7, 16, 64), (8, 16, 64), (8, 32, 128), (17, 48, 100), (33, 31, 1),
             (40, 70, 130), (130, 65, 193), (200, 37, 66)]
Q8_QUANT_SIZES = [1, 2, 7, 64, 300]


def check(level, slot, fmt, M, N, K, group=0, seed=0, block_rows=0):
    worst, msg = _core.slot_check(level, slot, fmt, M, N, K, group, seed, block_rows)
    where = (f"slot {slot} ({fmt}) wrong at level {level}, (M, N, K) = ({M}, {N}, {K}), group={group}, "
             f"block_rows={block_rows}")
    assert worst <= 1.0, f"{where}: {msg} (worst error {worst:.3g} x the tolerance)"
    if level == "amx-model":
        n, first = _core.tile_model_violations()
        assert n == 0, f"{where}: the tile model saw {n} rule violations, first: {first}"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("slot", ["gemm_nt", "gemm_nt_f32", "gemm_nn"])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_slots(level, slot, shape):
    check(level, slot, "bf16", *shape)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("group", [0, 32], ids=["per_row", "g32"])
@pytest.mark.parametrize("rows_cols", [(1, 2), (5, 64), (9, 130)], ids=lambda s: "x".join(map(str, s)))
def test_decode_slot(level, fmt, group, rows_cols):
    if fmt == "bf16" and group:
        pytest.skip("bf16 has no scale groups")
    check(level, "decode", fmt, rows_cols[0], 1, rows_cols[1], group)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("slot", ["bop_nt", "bop_nn", "bop_px"])
@pytest.mark.parametrize("fmt", FORMATS)
# g12: scale blocks shorter than a vector and off the 8-column grid (levels that decode 8 codes at a time)
@pytest.mark.parametrize("group", [0, 32, 12], ids=["per_row", "g32", "g12"])
@pytest.mark.parametrize("shape", BOP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prepared_operand_slots(level, slot, fmt, group, shape):
    if fmt == "bf16" and group:
        pytest.skip("bf16 has no scale groups")
    check(level, slot, fmt, *shape, group)


# The 2-D block formats (fp8): scale blocks of block_rows x group, partial at the bottom and right edges of
# every matrix these cases build (sizes not multiples of the block); the NN blocks of the backward cross
# block-row boundaries (K rows from row 1: 130 > 128, 100 > 64). DeepSeek's 128 x 128, a 64-row x 32-column
# block, and a small odd one.
BLOCKS_2D = [(128, 128), (64, 32), (3, 16)]  # (block_rows, group)
FORMATS_2D = sorted(_core.FORMAT_BLOCKS_2D)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("fmt", FORMATS_2D)
@pytest.mark.parametrize("block", BLOCKS_2D, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("rows_cols", [(1, 2), (9, 130), (200, 300)], ids=lambda s: "x".join(map(str, s)))
def test_decode_slot_2d_blocks(level, fmt, block, rows_cols):
    check(level, "decode", fmt, rows_cols[0], 1, rows_cols[1], block[1], block_rows=block[0])


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("slot", ["bop_nt", "bop_nn", "bop_px"])
@pytest.mark.parametrize("fmt", FORMATS_2D)
@pytest.mark.parametrize("block", BLOCKS_2D, ids=lambda b: f"b{b[0]}x{b[1]}")
@pytest.mark.parametrize("shape", BOP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prepared_operand_slots_2d_blocks(level, slot, fmt, block, shape):
    check(level, slot, fmt, *shape, block[1], block_rows=block[0])


def test_block_rows_refused_for_per_row_formats():
    with pytest.raises(ValueError, match="block_rows=4 for int8"):
        _core.slot_check("portable", "decode", "int8", 4, 1, 8, 8, 0, 4)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("slot", ["outer_f32", "outer_bf16"])
@pytest.mark.parametrize("shape", OUTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_lora_product_slots(level, slot, shape):
    check(level, slot, "bf16", *shape)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("slot", ["act_fwd", "act_bwd"])
@pytest.mark.parametrize("n", ACT_SIZES)
def test_activation_slots(level, slot, n):
    check(level, slot, "bf16", 1, n, 1)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("fmt", Q8_FORMATS)
@pytest.mark.parametrize("shape", Q8_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_w8a8_product_slot(level, fmt, shape):
    check(level, "bop_q8", fmt, *shape)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("n", Q8_QUANT_SIZES)
def test_w8a8_quantizer_slot(level, n):
    check(level, "q8_quant", "bf16", 1, n, 1)


def test_w8a8_slots_seeds_and_refusal():
    """Several seeds of one tile-sized case pass at every level; a format without an int8 view is refused."""
    for level in LEVELS:
        for seed in range(3):
            check(level, "bop_q8", "int4_1", 19, 40, 70, 0, seed)
    with pytest.raises(ValueError, match="no W8A8 view of bf16"):
        _core.slot_check("portable", "bop_q8", "bf16", 2, 2, 2)


def test_checks_are_sensitive():
    """The harness itself: many seeds of one case all pass, and an unusable level is refused by name."""
    for seed in range(5):
        check(LEVELS[-1], "bop_nn", "int4_1", 19, 40, 70, 32, seed)
    unusable = [lv for lv in _core.isa_levels() if not lv["usable"]]
    if unusable:
        with pytest.raises(ValueError, match=unusable[0]["name"]):
            _core.slot_check(unusable[0]["name"], "gemm_nt", "bf16", 2, 2, 2)
    with pytest.raises(ValueError, match="unknown slot"):
        _core.slot_check("portable", "gemm_xx", "bf16", 2, 2, 2)


def test_level_registry_reports_amx():
    info = ktmoe.cpu_info()
    names = [lv["name"] for lv in info["levels"]]
    assert "amx-model" in names and "amx-model" in info["isa_levels"], names
    assert set(info["amx"]) == {"detected", "permitted", "active"}
    model = next(lv for lv in info["levels"] if lv["name"] == "amx-model")
    assert model["usable"] and not model["auto"] and model["parent"] in info["isa_levels"]
    if not info["amx"]["detected"]:
        amx = next(lv for lv in info["levels"] if lv["name"] == "amx")
        assert not amx["usable"] and amx["why_not"]
        assert info["isa_detected"] != "amx" and not info["amx"]["active"]
        try:  # asking for it falls back along its parents, never to a tile instruction
            assert ktmoe.set_isa("amx") not in ("amx", "amx-model")
        finally:
            ktmoe.set_isa(None)


def test_descriptor_rejects_unknown_format_and_layout_sizes():
    layer = _core.Layer(2, 1, 64, 32, 0, 0.0, [0, 32])
    buf = bytearray(2 * 32 * 64 * 2)
    import ctypes
    addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    with pytest.raises(ValueError, match="unknown weight format code 99"):
        layer.set_weight(0, "gate", 99, addr, 0, 0, 32, 64, 0, 0, 64)
    with pytest.raises(ValueError, match="missing scales"):
        layer.set_weight(0, "gate", _core.WEIGHT_FORMATS["int8"], addr, 0, 0, 32, 64, 0, 0, 64)
    with pytest.raises(ValueError, match="group=48 must divide cols=64"):
        layer.set_weight(0, "gate", _core.WEIGHT_FORMATS["bf16"], addr, 0, 0, 32, 64, 0, 0, 48)
    with pytest.raises(ValueError, match="does not fit"):
        layer.set_weight(0, "down", _core.WEIGHT_FORMATS["bf16"], addr, 0, 0, 32, 64, 0, 0, 64)
    layer.set_weight(0, "gate", _core.WEIGHT_FORMATS["bf16"], addr, 0, 0, 32, 64, 0, 0, 64)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("offset", [0, 1, 7, 15])  # floats past a 64-byte boundary
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 33, 1000])
@pytest.mark.parametrize("copy", [0, 1], ids=["zeros", "copy"])
def test_stream_slot(level, offset, n, copy):
    """stream_f32 writes exactly dst[0, n) (the values, or zeros), whatever the alignment: the streamed body,
    the cached head and tail, nothing before or after."""
    check(level, "stream_f32", "bf16", offset + 1, n, copy)
