"""More than one process on torch.distributed: expert parallelism, DDP with the experts on the CPU, shared weights.

ktmoe adds no transport of its own: every exchange is a torch.distributed collective (gloo for CPU tensors, NCCL
where GPUs are). See docs/distributed.md for the modes and when to use which."""
from .ddp import ExpertGradReducer, distributed_data_parallel
from .expert_parallel import ExpertPlacement, expert_blocks
from .grads import all_reduce_grads, expert_parallel_parameters, sync_gradients

__all__ = ["distributed_data_parallel", "ExpertGradReducer", "ExpertPlacement", "expert_blocks", "all_reduce_grads",
           "expert_parallel_parameters", "sync_gradients"]
