"""One rank of tests/test_expert_parallel.py, launched by torch.distributed.run (`python -m torch.distributed.run
--standalone --nproc_per_node N tests/expert_parallel_worker.py CASE OUT`), or alone (WORLD_SIZE unset) for the
single-process reference. Writes OUT/result_<rank>.pt.

CASE layer[,src=tensors+folder+mmap+hf]: one experts module, expert parallel, against the same layer with all
    experts in this process, on every rank's tokens (rank 1 routes no token at all when there are 3 ranks); the
    expert block packed from the model's tensors, read from a weight folder (OUT/../kt, `python -m ktmoe.convert`;
    or mapped, mmap=True) or streamed from a checkpoint (OUT/../hf, `ktmoe.hf.from_pretrained`).
CASE train[,gc=1][,save=1][,family=deepseek_v3]: a tiny model trained 3 SGD steps, experts expert-parallel, attention LoRA
    data-parallel (`ktmoe.parallel.sync_gradients`), every rank its quarter of the global batch."""
import os
import sys

import torch

torch.set_num_threads(1)

import ktmoe.hf as kh  # noqa: E402
from ktmoe.lora import LORA_NAMES  # noqa: E402
from ktmoe.parallel import sync_gradients  # noqa: E402

STEPS, BATCH, SEQ, LR = 3, 6, 8, 0.05
TINY = dict(num_experts=8, num_experts_per_tok=3)  # 8 experts over 3 ranks: blocks of 3, 3, 2


def tiny(family: str = "qwen3_moe"):
    """The test's model: Qwen3-MoE with 8 experts; or deepseek_v3's tiny config as it is (4 experts in n_group=2
    groups, group-limited routing: over 2 ranks each rank owns one group)."""
    return kh.tiny_model(family, seed=3, **(TINY if family == "qwen3_moe" else {}))


def _world():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        return world, dist.get_rank()
    return 1, 0


def layer_case(out, world, rank, opts):
    results = {src: _layer(out, world, rank, src) for src in opts.get("src", "tensors").split("+")}
    torch.save(results, os.path.join(out, f"result_{rank}.pt"))


def _layer(out, world, rank, src):
    here = os.path.dirname(os.path.abspath(out))
    opt = dict(lora_rank=4, lora_alpha=8.0, seed=5, cpuinfer_threads=1)
    if src == "hf":
        model = kh.from_pretrained(os.path.join(here, "hf"), progress=False, expert_parallel=world > 1, **opt)
    else:
        model = kh.tiny_model("qwen3_moe", seed=3, **TINY)
        folder = src in ("folder", "mmap")
        kh.convert_model(model, expert_parallel=world > 1, weight_path=os.path.join(here, "kt") if folder else None,
                         mmap=src == "mmap", **opt)
    whole = kh.tiny_model("qwen3_moe", seed=3, **TINY)
    kh.convert_model(whole, **opt)
    ep = next(iter(kh.routed_experts(model).values()))
    ref = next(iter(kh.routed_experts(whole).values()))
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # non-zero B: the LoRA terms count
        for a, b in zip(ref.lora_parameters, ep.lora_parameters):
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(ep.own_block(a))
    E, k, H = ref.num_experts, ref.wrapper.k, ref.hidden_dim
    counts = [5, 0, 7][:world] if world == 3 else [6, 4][:world] if world == 2 else [16]
    xs, ids, ws, dys = [], [], [], []
    for r in range(max(world, 1)):  # every rank's tokens, the same on every process
        t = counts[r] if world > 1 else counts[0]
        xs.append(torch.randn(t, H, generator=g))
        ids.append(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]) if t else
                   torch.zeros(0, k, dtype=torch.long))
        ws.append(torch.rand(t, k, generator=g))
        dys.append(torch.randn(t, H, generator=g))
    # the reference: every rank's tokens through the whole layer at once
    x_all = torch.cat(xs).requires_grad_()
    w_all = torch.cat(ws).requires_grad_()
    y_all = ref(x_all, torch.cat(ids), w_all)
    (y_all * torch.cat(dys)).sum().backward()
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    y = ep(x, ids[rank], w)
    (y * dys[rank]).sum().backward()
    with torch.no_grad():
        y_nograd = ep(xs[rank], ids[rank], ws[rank])
    return {"y": y.detach(), "y_ref": y_all.detach()[lo:hi], "y_nograd": y_nograd,
                "dx": x.grad, "dx_ref": x_all.grad[lo:hi], "dw": w.grad, "dw_ref": w_all.grad[lo:hi],
                "lora_grad": {n: p.grad for n, p in zip(LORA_NAMES, ep.lora_parameters)},
                "lora_grad_ref": {n: ep.own_block(p.grad) for n, p in zip(LORA_NAMES, ref.lora_parameters)},
                "block": (ep.expert_parallel.first, ep.expert_parallel.end) if world > 1 else (0, E),
                "local_experts": ep.wrapper.E}


def train_case(out, world, rank, opts):
    family = opts.get("family", "qwen3_moe")
    model = tiny(family)
    kh.convert_model(model, lora_rank=4, lora_alpha=8.0, seed=3, cpuinfer_threads=1,
                     expert_parallel=world > 1 and opts.get("ep", "1") == "1")
    pm = kh.add_lora(model, r=4, lora_alpha=8.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # every rank draws the whole tensors, the experts keep their block
        for _, p in kh.trainable_parameters(pm):
            mod = _owner(pm, p)
            whole = (mod.num_experts,) + tuple(p.shape[1:]) if mod is not None else p.shape
            v = torch.randn(whole, generator=g) * 0.1
            p.copy_(mod.own_block(v) if mod is not None else v)
    if opts.get("gc") == "1":
        kh.base_model_of(pm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    params = [p for _, p in kh.trainable_parameters(pm)]
    opt = torch.optim.SGD(params, lr=LR)
    gb = torch.Generator().manual_seed(5)
    losses = []
    for _ in range(STEPS):
        x = torch.randint(0, 64, (BATCH, SEQ), generator=gb)
        per = BATCH // world
        xs = x[rank * per:(rank + 1) * per]
        loss = pm(input_ids=xs, labels=xs).loss  # equal lengths: the mean of the ranks' means is the global mean
        loss.backward()
        lv = loss.detach().clone()
        if world > 1:
            import torch.distributed as dist

            sync_gradients(pm, average=True)
            dist.all_reduce(lv)
            lv /= world
        opt.step()
        opt.zero_grad()
        losses.append(lv.item())
    result = {"losses": losses}
    if opts.get("save") == "1":
        path = os.path.join(out, "adapter")
        kh.save_adapter(pm, path)
        if world > 1:  # the adapter back: each rank takes its block, by load_adapter and by from_adapter
            import torch.distributed as dist

            dist.barrier()  # rank 0 has written it
            trained = {n: p.detach().clone() for n, p in kh.trainable_parameters(pm)}
            again = tiny(family)
            kh.convert_model(again, lora_rank=4, lora_alpha=8.0, seed=99, cpuinfer_threads=1,
                             expert_parallel=True)
            again = kh.add_lora(again, r=4, lora_alpha=8.0)
            kh.load_adapter(again, path)
            fresh = kh.from_adapter(tiny(family), path, cpuinfer_threads=1,
                                    expert_parallel=True)
            result["reload_max_diff"] = max(float((dict(kh.trainable_parameters(m))[n] - t).abs().max())
                                            for m in (again, fresh) for n, t in trained.items())
    torch.save(result, os.path.join(out, f"result_{rank}.pt"))


def _owner(pm, p):
    for m in kh.routed_experts(pm).values():
        if any(p is q for q in m.lora_parameters):
            return m
    return None


def main():
    case, out = sys.argv[1], sys.argv[2]
    name, *rest = case.split(",")
    opts = dict(kv.split("=") for kv in rest if kv)
    world, rank = _world()
    if name == "layer":
        layer_case(out, world, rank, opts)
    else:
        train_case(out, world, rank, opts)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
