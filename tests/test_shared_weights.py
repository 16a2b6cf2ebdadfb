"""Issue #13, one copy of the frozen experts per node: `convert_model(weight_path=DIR, mmap=True)` keeps each
layer's weight file mapped, so ranks on one node share its pages. Two ranks under torchrun measure the Pss of the
weight files' mappings while both are alive (one copy in all); single-process tests cover the options, deepcopy
and pickling of a mapped model. (A file changed under a mapped wrapper: tests/test_reliability.py.)"""
import copy
import dataclasses
import io
import json
import os
import textwrap
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402

import ktmoe  # noqa: E402
import ktmoe.hf as kh  # noqa: E402
from ktmoe import weights_io  # noqa: E402
from conftest import THREADS  # noqa: E402
from launch import launch  # noqa: E402

# a few MiB per layer (bf16: 3 x E x I x H x 2 bytes = 6 MiB), so that page-level noise is irrelevant
BIG = dict(hidden_size=256, moe_intermediate_size=512, num_experts=8, num_hidden_layers=2)
SEED = 13
needs_proc = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads /proc/self/smaps (Linux)")


def _weight_folder(root, **config):
    src = kh.tiny_model("qwen3_moe", seed=SEED, **config)
    src.save_pretrained(root / "hf")
    from ktmoe.convert import convert_checkpoint

    convert_checkpoint(str(root / "hf"), str(root / "kt"), "AMXBF16_SFT", progress=False)
    return str(root / "kt")


def _converted(folder, **kw):
    model = kh.tiny_model("qwen3_moe", seed=SEED + 1, **BIG)  # its own expert tensors differ from the folder's
    return kh.convert_model(model, lora_rank=2, lora_alpha=4.0, weight_path=folder, cpuinfer_threads=THREADS, **kw)


def _logits(model):
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=x).logits


def _mapped_ranges(path):
    """[(start, end)] of this process's mappings of `path` (/proc/self/maps)."""
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[5].strip() == path:
                a, b = fields[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    return out


def _in_file_mapping(module) -> bool:
    """Whether every packed tensor of this experts module lies in a mapping of its layer's file."""
    w = module.wrapper
    ranges = _mapped_ranges(weights_io.layer_path(w.weight_path, w.layer_idx))
    ptrs = [t.data_ptr() for p in w._weights for t in (p.data, p.scale, p.zero) if t is not None]
    return all(any(a <= q < b for a, b in ranges) for q in ptrs)


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    return _weight_folder(tmp_path_factory.mktemp("shared"), **BIG)


# ------------------------------------------------------------------------------------------- two ranks
WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import ktmoe.hf as kh

    folder, out, config, seed = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    files = {os.path.realpath(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")}

    def mapped_kib():
        # {file: [Rss, Pss]} in kB over this process's mappings of the weight folder's layer files
        got, cur = {}, None
        with open("/proc/self/smaps") as f:
            for line in f:
                fields = line.split(None, 5)
                if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                    cur = fields[5].strip() if len(fields) == 6 else None
                    cur = cur if cur in files else None
                elif cur is not None and fields[0] in ("Rss:", "Pss:"):
                    got.setdefault(cur, [0, 0])[fields[0] == "Pss:"] += int(fields[1])
        return got

    dist.init_process_group("gloo")
    model = kh.tiny_model("qwen3_moe", seed=seed, **config)
    kh.convert_model(model, lora_rank=2, lora_alpha=4.0, weight_path=folder, mmap=True, cpuinfer_threads=1)
    experts = list(kh.routed_experts(model).values())
    for m in experts:  # every page resident (the load's finite check reads them too; this does not depend on it)
        for p in m.wrapper._weights:
            p.data.view(torch.uint8).sum()
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(input_ids=x, labels=x).loss.backward()
    assert all(m.down_lora_b.grad is not None and torch.isfinite(m.down_lora_b.grad).all() for m in experts)
    dist.barrier()  # both ranks hold their mappings now
    got = mapped_kib()
    dist.barrier()  # ... and until both have read them
    with open(os.path.join(out, f"rank_{dist.get_rank()}.json"), "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()
""")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@needs_proc
def test_two_ranks_map_one_copy(big_folder, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    launch([str(worker), big_folder, str(tmp_path), json.dumps(BIG), str(SEED + 1)], 2)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]

    layer_files = {os.path.realpath(os.path.join(big_folder, f)) for f in os.listdir(big_folder)
                   if f.endswith(".safetensors")}
    assert len(layer_files) == BIG["num_hidden_layers"]
    for got in ranks:
        assert set(got) == layer_files, got  # every layer mapped, by both ranks
    size_kib = sum(os.path.getsize(f) for f in layer_files) / 1024
    rss = [sum(v[0] for v in got.values()) for got in ranks]
    pss = [sum(v[1] for v in got.values()) for got in ranks]
    print(f"\nlayer files {size_kib:.0f} kB; Rss per rank {rss} kB; Pss per rank {pss} kB, summed {sum(pss)} kB")
    assert all(r >= 0.95 * size_kib for r in rss), (rss, size_kib)  # every page resident in each rank
    assert sum(pss) <= 1.3 * size_kib, (pss, size_kib)  # ... yet one copy on the node


# ------------------------------------------------------------------------------------------- one process
@pytest.mark.usefixtures("one_torch_thread")
def test_mmap_options_are_checked(big_folder):
    with pytest.raises(ValueError, match=r"mmap=True needs weight_path="):
        kh.convert_model(kh.tiny_model("qwen3_moe"), lora_rank=2, lora_alpha=4.0, mmap=True)
    with pytest.raises(ValueError, match=r"numa_local=True copies them"):
        _converted(big_folder, mmap=True, numa_local=True)
    w = next(iter(kh.routed_experts(_converted(big_folder, mmap=True)).values())).wrapper
    with pytest.raises(ValueError, match="cannot take physical_to_logical_map"):
        w.load_weights(torch.arange(w.E).flip(0), mmap=True)


@pytest.mark.usefixtures("one_torch_thread")
def test_tp_subpools_read_the_one_mapping(big_folder):
    """threadpool_count=2 over a mapped layer: each subpool reads its slice of the mapping, with no node-local
    copies even when the subpools span NUMA nodes; the same answer as owned weights."""
    kw = dict(mode="sft", method="AMXBF16_SFT", layer_idx=0, num_experts=BIG["num_experts"], num_experts_per_tok=2,
              hidden_size=BIG["hidden_size"], moe_intermediate_size=BIG["moe_intermediate_size"], lora_rank=0,
              threadpool_count=2, cpuinfer_threads=2, weight_path=big_folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # another engine size than the suite's
        owned, mapped = ktmoe.KTMoEWrapper(**kw), ktmoe.KTMoEWrapper(**kw)
    for w in (owned, mapped):  # as if the two subpools ran on two NUMA nodes (numa_local=None: automatic)
        w._engine = dataclasses.replace(w._engine, numa_nodes=(0, 1))
    owned.load_weights()
    mapped.load_weights(mmap=True)
    assert owned._part_weights is not None  # node-local copies of owned weights ...
    assert mapped._part_weights is None and mapped._mapped is not None  # ... none of a mapped file
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, BIG["hidden_size"], generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(BIG["num_experts"], generator=g)[:2] for _ in range(16)])
    rw = torch.rand(16, 2, generator=g)
    assert torch.equal(mapped.forward(x, ids, rw), owned.forward(x, ids, rw))


@needs_proc
@pytest.mark.usefixtures("one_torch_thread")
def test_a_mapped_model_copies_and_pickles(tmp_path):
    folder = _weight_folder(tmp_path, **BIG)
    owned, mapped = _converted(folder), _converted(folder, mmap=True)
    ref = _logits(owned)
    assert torch.equal(_logits(mapped), ref)
    a = next(iter(kh.routed_experts(mapped).values()))
    assert _in_file_mapping(a) and not _in_file_mapping(next(iter(kh.routed_experts(owned).values())))

    twin = copy.deepcopy(mapped)  # shares the mapped views, and checks the file as the original does
    b = next(iter(kh.routed_experts(twin).values()))
    assert b.wrapper is not a.wrapper and _in_file_mapping(b) and b.wrapper._mapped == a.wrapper._mapped
    assert torch.equal(_logits(twin), ref)
    buf = io.BytesIO()
    torch.save(mapped, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # owned memory now: no file to check
    c = next(iter(kh.routed_experts(loaded).values()))
    assert c.wrapper._mapped is None and not _in_file_mapping(c)
    assert torch.equal(_logits(loaded), ref)

    path = weights_io.layer_path(folder, a.wrapper.layer_idx)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a rewrite would
    for model in (mapped, twin):
        with pytest.raises(RuntimeError, match="changed since it was loaded"):
            _logits(model)
    with pytest.raises(RuntimeError, match="changed since it was loaded"):
        torch.save(mapped, io.BytesIO())
    with pytest.raises(RuntimeError, match="changed since it was loaded"):
        copy.deepcopy(mapped)
    assert torch.equal(_logits(loaded), ref)
