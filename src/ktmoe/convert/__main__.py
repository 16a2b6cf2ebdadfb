"""python -m ktmoe.convert --input HF_DIR --output OUT_DIR --method AMXINT4_SFT [--group-size 128] [--layers 0,1]

Writes a ktmoe pre-quantized weight folder (docs/weight_format.md) from a Hugging Face checkpoint folder,
then checks what it wrote. `python -m ktmoe.convert --check OUT_DIR` re-checks an existing folder."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import ConvertError, convert_checkpoint, parse_layers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ktmoe.convert",
                                description="Convert the routed experts of a Hugging Face MoE checkpoint (safetensors; "
                                            "bf16/fp16/fp32; transformers v5 fused or v4 per-expert keys) into a "
                                            "ktmoe pre-quantized weight folder for KTMoEWrapper(weight_path=...).")
    p.add_argument("--input", help="Hugging Face checkpoint folder (*.safetensors, optional index.json)")
    p.add_argument("--output", help="output folder (created; an existing ktmoe folder of the same format gets "
                                    "the layers added / replaced)")
    p.add_argument("--method", help="ktmoe method, e.g. AMXINT4_SFT (its weight format is written; the SFT and "
                                    "inference methods of one format read the same folder)")
    p.add_argument("--group-size", type=int, default=128, help="K-group size for *_KGroup methods (default 128)")
    p.add_argument("--layers", default=None, help="layer indices to convert, e.g. 0,1,5-7 (default: all MoE layers)")
    p.add_argument("--prefix", default=None, help="key prefix before 'layers.' when several exist "
                                                   "(e.g. 'model.language_model.')")
    p.add_argument("--no-check", action="store_true", help="skip re-reading and checking what was written")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check", metavar="OUT_DIR", default=None,
                   help="only check an existing ktmoe weight folder (manifest, sizes, sha256, keys, shapes)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.check:
            from ..weights_io import read_manifest, verify_folder

            done = verify_folder(args.check, checksum=True)
            m = read_manifest(args.check)
            print(f"{args.check}: OK, format {m['format']} v{m['format_version']}, group_size {m.get('group_size')}, "
                  f"E={m['num_experts']} H={m['hidden_size']} I={m['moe_intermediate_size']}, layers {done}")
            return 0
        missing = [f"--{n}" for n in ("input", "output", "method") if not getattr(args, n)]
        if missing:
            build_parser().error(f"the following arguments are required: {', '.join(missing)}")
        s = convert_checkpoint(args.input, args.output, args.method, args.group_size, parse_layers(args.layers),
                               prefix=args.prefix, progress=not args.quiet, check=not args.no_check)
    except (ConvertError, ValueError, FileNotFoundError) as e:
        print(f"ktmoe.convert: error: {e}", file=sys.stderr)
        return 2
    checked = "" if args.no_check else f", checked (sample rel-L2 vs checkpoint <= {s['sample_rel_l2']:.2e})"
    print(f"wrote {len(s['layers'])} layer(s) {s['layers'][0]}..{s['layers'][-1]} of format {s['format']} "
          f"(E={s['num_experts']} H={s['hidden_size']} I={s['moe_intermediate_size']}) to {s['output']}: "
          f"{s['bytes'] / 2**20:.1f} MiB in {s['seconds']:.1f}s{checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
