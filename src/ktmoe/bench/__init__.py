"""`python -m ktmoe.bench` (console script `ktmoe-bench`): speed of the routed-experts layer, forward and
backward with LoRA, against this machine's measured peak, the PyTorch reference and (optionally)
kt-kernel, all measured in one run.

What is timed, per (preset, token count T, method): one `forward_sft(x, ids, w, save_for_backward=True)`
and one `backward(dy)` of a single MoE layer; samples of every path (ktmoe per method, the PyTorch
reference, kt-kernel per method) are interleaved round-robin, the order rotating each round, and the
median of `--repeats` rounds is reported. The kt-kernel process is SIGSTOPped while the others run.

Workload (ktmoe/bench/workload.py, shared with the kt-kernel driver): expert ids from a seeded uniform
random top-k (k distinct experts per token), routing weights = softmax of random logits (fp32), hidden
states and grad_output bf16 N(0, 1), frozen weights bf16 N(0, 1/fan_in), LoRA A ~ N(0, 1/fan_in) and
B ~ N(0, 0.02^2) (non-zero so LoRA is real work), lora_alpha = 32.

FLOP count, per (token, expert) pair (the bench has T*k pairs; no slot is skipped), with H hidden, I
intermediate and r the LoRA rank; elementwise work (SiLU, products, routing-weight gradient) not counted:

    forward   base:  gate + up  2*2*H*I,  down 2*H*I                              =  6*H*I
              LoRA:  gate/up A  2*2*H*r,  gate/up B 2*2*I*r,
                     down A     2*I*r,    down B    2*H*r                         =  6*r*(H+I)
    backward  base:  dh = W_d^T G  2*H*I,  dx = W_g^T dg + W_u^T du  4*H*I        =  6*H*I
              (the base weights are frozen: no weight gradient)
              LoRA:  per adapter (A: r x in, B: out x r) dB, dz = B^T dy, dA, dx += A^T dz,
                     i.e. twice its forward                                      = 12*r*(H+I)
    step = forward + backward                                                     = 12*H*I + 18*r*(H+I)

GFLOP/s = step FLOPs / (fwd + bwd time). "% peak" divides by the bf16 peak this run measures with the
engine (`measure_peak_gflops`, at the active ISA level, all engine threads; measured at the start and
again at the end of the run, the higher value used, as is for the read bandwidth). "% BW bound" (shown where the
step is bandwidth-bound, i.e. small T) is t_bound / t_measured with t_bound = 2 * n_touched * 3*H*I*2
bytes (each touched expert's bf16 weights read once in forward, once in backward; for quantized methods
the expert's packed bytes, wrapper.weight_nbytes() / E, replace 3*H*I*2) / measured read GB/s.
"x vs torch" and "x vs kt-kernel" are (their fwd+bwd median) / (ktmoe fwd+bwd median), so > 1 means ktmoe
is faster.

Python overhead: at T=1 and T=16, wall time of forward_sft / backward minus the time spent inside the
native calls (the Context's plan/forward/backward, timed by a subclass swapped in for the bench only).

Memory: VmRSS before the weights, after load (+ LoRA) and after one step; compared with the bytes of the
weights + LoRA the wrapper holds. The kt-kernel driver reports the same from its own process."""
from .workload import PRESETS, Preset, pair_flops, step_flops

__all__ = ["PRESETS", "Preset", "pair_flops", "step_flops"]
