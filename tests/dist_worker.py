"""One rank of the multi-process tests (run by tests/test_fsdp.py as `tests/dist_worker.py CASE OUT` under torchrun,
2 or 3 ranks, or alone).

RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT come from the environment; WORLD_SIZE=1 without them is the
single-process reference on the combined batch. Writes OUT/result_<rank>.pt: the losses, the trained parameters
(gathered whole) and each sharded parameter's local shape on this rank (3 ranks: uneven shards, some empty)."""
import os
import sys

import torch

torch.set_num_threads(1)

import ktmoe.hf as kh  # noqa: E402
from ktmoe.lora import LORA_NAMES  # noqa: E402

STEPS, BATCH, SEQ, LR = 3, 6, 8, 0.05  # BATCH: equal shares over 2 or 3 ranks


def build(gc: bool):
    model = kh.tiny_model("qwen3_moe", seed=3)
    kh.convert_model(model, lora_rank=4, lora_alpha=8.0, seed=3, cpuinfer_threads=1)
    pm = kh.add_lora(model, r=4, lora_alpha=8.0)  # attention LoRA too: FSDP shards both kinds
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, p in kh.trainable_parameters(pm):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if gc:
        kh.base_model_of(pm).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()
    return pm


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main():
    case, out = sys.argv[1], sys.argv[2]
    opts = dict(kv.split("=") for kv in case.split(",") if kv)
    gc, reshard = opts.get("gc") == "1", opts.get("reshard") == "1"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    pm = build(gc)
    if world > 1:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))
        base = kh.base_model_of(pm)
        for layer in base.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(pm, mesh=mesh, reshard_after_forward=reshard)
    shards = {n: tuple(p.to_local().shape)  # DTensors under FSDP2
              for n, p in kh.trainable_parameters(pm) if hasattr(p, "to_local")}
    params = [p for _, p in kh.trainable_parameters(pm)]
    opt = torch.optim.SGD(params, lr=LR)
    losses = []
    for x in batches():
        per = BATCH // world
        xs = x[rank * per:(rank + 1) * per]
        loss = pm(input_ids=xs, labels=xs).loss  # equal lengths: the mean of rank means is the global mean
        loss.backward()
        opt.step()
        opt.zero_grad()
        lv = loss.detach().clone()
        if world > 1:
            dist.all_reduce(lv)
            lv /= world
        losses.append(lv.item())
    lora = {n: full(p.detach()).clone() for n, p in kh.trainable_parameters(pm)}
    if opts.get("save") == "1":
        kh.save_adapter(pm, os.path.join(out, "adapter"))
    if opts.get("outside") == "1":  # an experts module called by itself, its LoRA sharded (DTensor)
        experts = next(iter(kh.routed_experts(pm).values()))
        xh = torch.randn(3, experts.hidden_dim)
        ids = torch.zeros(3, experts.wrapper.k, dtype=torch.long)
        try:
            experts(xh, ids, torch.ones(3, experts.wrapper.k))
            lora["outside_error"] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            lora["outside_error"] = f"{type(e).__name__}: {e}"
    torch.save({"losses": losses, "params": lora, "shards": shards}, os.path.join(out, f"result_{rank}.pt"))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
