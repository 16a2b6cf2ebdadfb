"""`python -m ktmoe.bench` / `ktmoe-bench`: see ktmoe/bench/__init__.py for what is measured and how.

Examples:
    python -m ktmoe.bench                                   # Qwen3-30B-A3B layer, T=16 and 1024
    python -m ktmoe.bench --preset deepseek-v2-lite --preset mixtral-8x7b --tokens 1,16,512
    python -m ktmoe.bench --peer-python /path/to/kt-kernel-env/bin/python --markdown bench.md --json bench.json
    python -m ktmoe.bench --smoke                           # tiny shape, T=16, one round (CI)
    python -m ktmoe.bench --accuracy --peer-python /path/to/kt-kernel-env/bin/python   # accuracy, every method
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from .. import _core
from ..methods import SFT_METHODS
from .peer import PEER_ENV
from .workload import PRESETS, allowed_cpu_count


def _tokens(text: str) -> List[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens wants a comma-separated list of integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"--tokens wants positive integers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ktmoe.bench",
                                description="Speed of ktmoe's routed experts (forward + backward with LoRA) "
                                            "against the measured peak, the PyTorch reference and kt-kernel.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                   help="layer shape (repeatable); default qwen3-30b-a3b (--accuracy: small)")
    p.add_argument("--tokens", type=_tokens, default=None,
                   help="token counts T, comma-separated; default 16,1024 (--accuracy: 64)")
    p.add_argument("--rank", type=_positive, default=None, help="LoRA rank; default 16 (--accuracy: 8)")
    p.add_argument("--threads", type=_positive, default=None, help="engine threads (default: all allowed CPUs)")
    p.add_argument("--threadpool-count", type=_positive, default=1, help="TP subpools")
    p.add_argument("--method", action="append", choices=sorted(SFT_METHODS),
                   help="SFT method (repeatable); default AMXBF16_SFT (--accuracy: every SFT method)")
    p.add_argument("--isa", default=None, choices=list(_core.ISA_LEVELS),
                   help="cap the instruction-set level (ktmoe.set_isa; default: the best this CPU has)")
    p.add_argument("--repeats", type=_positive, default=7, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the PyTorch reference (ktmoe.moe_reference, bf16, autograd)")
    p.add_argument("--peer-python", default=None,
                   help=f"interpreter with kt-kernel installed, to time it in a subprocess (or ${PEER_ENV})")
    p.add_argument("--markdown", metavar="FILE", help="also write the markdown report here")
    p.add_argument("--json", metavar="FILE", help="write every measurement (with all samples) as JSON here")
    p.add_argument("--smoke", action="store_true", help="tiny preset, T=16, one round: for CI")
    p.add_argument("--expert-parallel", action="store_true",
                   help="instead: one layer's step with the experts over 2 ranks (1 CPU each, torchrun + gloo) next "
                        "to 1 rank with 2 CPUs, and the bytes exchanged (each --preset; --tokens per rank, "
                        "default 256)")
    p.add_argument("--accuracy", action="store_true",
                   help="instead of speed: rel-L2 error of y and every gradient vs the fp32 reference (on the "
                        "original bf16 and on the dequantized weights), per method, next to kt-kernel's on the "
                        "same inputs (see ktmoe/bench/accuracy.py)")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if args.smoke:
        args.preset = ["tiny"]
        args.tokens = [16]
        args.repeats = 1
        args.warmup = 1
    if args.expert_parallel:
        args.tokens = args.tokens or [256]
    if args.accuracy:
        from .accuracy import DEFAULT_PRESET, DEFAULT_RANK, DEFAULT_TOKENS, METHOD_ORDER
        defaults = ([DEFAULT_PRESET], DEFAULT_TOKENS, DEFAULT_RANK, METHOD_ORDER)
    else:
        defaults = (["qwen3-30b-a3b"], [16, 1024], 16, ["AMXBF16_SFT"])
    args.preset = list(dict.fromkeys(args.preset or defaults[0]))
    args.tokens = list(dict.fromkeys(args.tokens or defaults[1]))
    args.rank = args.rank or defaults[2]
    args.method = list(dict.fromkeys(args.method or defaults[3]))
    if args.threads is None:
        args.threads = allowed_cpu_count()
    if args.threads < args.threadpool_count:
        build_parser().error(f"--threads {args.threads} is fewer than --threadpool-count {args.threadpool_count}")
    if args.warmup < 0:
        build_parser().error("--warmup must be >= 0")
    if args.peer_python is None:
        args.peer_python = os.environ.get(PEER_ENV) or None
    if args.peer_python and not os.access(args.peer_python, os.X_OK):
        build_parser().error(f"--peer-python {args.peer_python!r} is not an executable file")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.expert_parallel:
        from .expert_parallel import render, run
    elif args.accuracy:
        from .accuracy import render, run  # late: keep --help fast
    else:
        from .report import render
        from .runner import run

    result = run(args)
    md = render(result)
    print(md)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
