"""One rank of tests/test_ddp_experts.py, run under `torch.distributed.run --nproc_per_node N` (N = 2 or 3; gloo,
CPU) as `ddp_worker.py OUT [CASE,CASE...]` (all the cases and checks when no list is given).

Every case trains a fresh tiny Qwen3-MoE three ways from the same start: with `ktmoe.parallel
.distributed_data_parallel` on this rank's share of each batch, with plain DDP (possible here since everything is
on the CPU), and in this process alone on the combined batch (the reference, the same on every rank). Writes
OUT/result_<rank>.pt: {case: {"losses": {way: [...]}, "params": {way: {name: tensor}}, ...checks}}."""
import os
import sys

import torch

torch.set_num_threads(1)

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import ktmoe.hf as kh  # noqa: E402
from ktmoe.parallel import distributed_data_parallel  # noqa: E402

STEPS, BATCH, SEQ, LR = 3, 12, 8, 0.05  # BATCH: 2 or 3 ranks, each share in 1 or 2 equal micro-batches


def build(peft: bool, gc: str, experts_only: bool = False):
    """gc: "" (off), "plain" (non-reentrant checkpointing) or "reentrant"."""
    model = kh.tiny_model("qwen3_moe", seed=3)
    kh.convert_model(model, lora_rank=4, lora_alpha=8.0, seed=3, cpuinfer_threads=1)
    if peft:
        model = kh.add_lora(model, r=4, lora_alpha=8.0, target_modules=[] if experts_only else None)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # non-zero LoRA B: every LoRA tensor gets a gradient from the first step
        for n, p in kh.trainable_parameters(model):
            if "lora" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    if gc:
        kh.base_model_of(model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": gc == "reentrant"})
    model.train()
    return model


def batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (BATCH, SEQ), generator=g) for _ in range(STEPS)]


def same_on_all_ranks(tensors) -> bool:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], t) for t in everyone[1:])


def train(model, wrapped, world, rank, micro, log=None):
    """STEPS SGD steps on this rank's share of each batch in `micro` micro-batches (all but the last under
    no_sync when wrapped in DDP); returns the losses averaged over the ranks."""
    opt = torch.optim.SGD([p for _, p in kh.trainable_parameters(model)], lr=LR)
    per = BATCH // world
    experts = [p for n, p in kh.trainable_parameters(model) if ".experts." in n]
    losses = []
    for x in batches():
        xs = x[rank * per:(rank + 1) * per].chunk(micro)
        total = 0.0
        for j, xm in enumerate(xs):
            last = j == len(xs) - 1
            ctx = wrapped.no_sync() if not last and world > 1 else torch.enable_grad()
            with ctx:  # equal lengths: the mean of the micro-batch means is the batch mean
                loss = wrapped(input_ids=xm, labels=xm).loss / len(xs)
                loss.backward()
            total += loss.detach()
            if log is not None and not last:  # after a no_sync backward: the local gradients, not reduced
                log.setdefault("local_grads_same", []).append(same_on_all_ranks([p.grad for p in experts]))
        if log is not None:
            log.setdefault("reduced_grads_same", []).append(same_on_all_ranks([p.grad for p in experts]))
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.all_reduce(total)
            total /= world
        losses.append(float(total))
    return losses, {n: p.detach().clone() for n, p in kh.trainable_parameters(model)}


def run_case(peft, gc, micro, world, rank):
    out = {"losses": {}, "params": {}}
    ref = build(peft, gc)
    out["params"]["init"] = {n: p.detach().clone() for n, p in kh.trainable_parameters(ref)}
    out["losses"]["ref"], out["params"]["ref"] = train(ref, ref, 1, 0, 1)

    plain = build(peft, gc)
    out["losses"]["plain"], out["params"]["plain"] = train(plain, DistributedDataParallel(plain), world, rank, micro)

    model = build(peft, gc)
    ddp = distributed_data_parallel(model)
    reducer = ddp.expert_grads
    experts = [n for n, _ in kh.trainable_parameters(model) if ".experts." in n]
    in_ddp = {id(p) for p in ddp._module_parameters}
    out["expert_names"] = experts
    out["reducer_names"] = list(reducer.names)
    out["ignored"] = sorted(ddp.parameters_to_ignore)
    out["expert_in_ddp"] = [n for n, p in model.named_parameters() if n in experts and id(p) in in_ddp]
    out["ddp_tensors"] = ddp._get_ddp_logging_data()["num_parameter_tensors"]
    out["trainable_outside_experts"] = len(kh.trainable_parameters(model)) - len(experts)
    # overlap: when the first layer's experts get their gradients, the later layers' all-reduces are launched
    first = next(p for n, p in model.named_parameters() if n == experts[0])
    launched = []
    first.register_post_accumulate_grad_hook(lambda p: launched.append((reducer._active, len(reducer._works))))
    log = {}
    out["losses"]["helper"], out["params"]["helper"] = train(model, ddp, world, rank, micro, log)
    out.update(log, launched=launched)
    return out


def groups():
    """The experts' own gloo group; another DDP group needs one given; wrapping again replaces the reducer."""
    out = {}
    model = build(peft=True, gc="")
    ddp = distributed_data_parallel(model)
    group = ddp.expert_grads.group
    out["own_group"] = group is not dist.group.WORLD and dist.get_backend_config(group).startswith("cpu:gloo")
    pg = dist.new_group(backend="gloo")
    for case, kwargs in (("subgroup", {}), ("shared", {"experts_group": pg})):
        try:  # refused before anything is built or changed
            distributed_data_parallel(model, process_group=pg, **kwargs)
        except ValueError as e:
            out[case] = str(e)
    again = distributed_data_parallel(model, process_group=pg, experts_group=dist.new_group(backend="gloo"))
    out["rewrapped"] = (ddp.expert_grads._handles, len(again.expert_grads._handles))
    per = BATCH // dist.get_world_size()
    x = batches()[0][dist.get_rank() * per:][:per]
    again(input_ids=x, labels=x).loss.backward()
    out["grads_same"] = same_on_all_ranks([p.grad for n, p in kh.trainable_parameters(model) if ".experts." in n])
    return out


def missing_grad():
    """One expert LoRA tensor gets no gradient on rank 1 (frozen there for the step): it counts as zeros."""
    model = build(peft=True, gc="")
    ddp = distributed_data_parallel(model)
    name, p = [(n, p) for n, p in kh.trainable_parameters(model) if ".experts." in n][-1]  # launched first
    rank, per = dist.get_rank(), BATCH // dist.get_world_size()
    x = batches()[0][rank * per:][:per]
    p.requires_grad_(rank == 0)
    with ddp.no_sync():  # this rank's own gradient
        ddp(input_ids=x, labels=x).loss.backward()
    local = None if p.grad is None else p.grad.clone()
    model.zero_grad(set_to_none=True)
    ddp(input_ids=x, labels=x).loss.backward()
    return {"name": name, "local": local, "reduced": p.grad.clone(), "same": same_on_all_ranks([p.grad])}


def errors():
    out = {}
    try:
        distributed_data_parallel(build(peft=True, gc="", experts_only=True))
    except ValueError as e:
        out["experts_only"] = str(e)
    try:
        distributed_data_parallel(kh.tiny_model("qwen3_moe", seed=3))
    except ValueError as e:
        out["unconverted"] = str(e)
    return out


CASES = {  # name: run_case's peft, gc, micro
    "peft": (True, "", 1),
    "accum": (True, "", 2),
    "gc": (True, "plain", 1),
    "gc_reentrant": (True, "reentrant", 2),
    "full": (False, "", 2),
}
CHECKS = {"groups": groups, "missing_grad": missing_grad, "errors": errors}


def main():
    out_dir = sys.argv[1]
    wanted = sys.argv[2].split(",") if len(sys.argv) > 2 else list(CASES) + list(CHECKS)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    assert BATCH % world == 0 and all(w in CASES or w in CHECKS for w in wanted), (world, wanted)
    res = {}
    for w in wanted:
        if w in CASES:
            peft, gc, micro = CASES[w]
            res[w] = run_case(peft=peft, gc=gc, micro=micro, world=world, rank=rank)
        else:
            res[w] = CHECKS[w]()
    torch.save(res, os.path.join(out_dir, f"result_{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
