"""`python -m ktmoe.train` / `ktmoe-train`: see `python -m ktmoe.train --help`."""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(argv)
    except ConfigError as e:
        print(f"ktmoe.train: error: {e}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .trainer import train

    try:
        result = train(cfg)
    except CheckpointError as e:
        print(f"ktmoe.train: error: {e}", file=sys.stderr)
        return 2
    if result.is_main:  # under torchrun only rank 0 reports
        print(result.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
