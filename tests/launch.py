"""Launching the multi-process tests' ranks: `python -m torch.distributed.run --standalone --nproc_per_node N`
(torchrun picks a free rendezvous port itself: no port races between tests), or one plain process for a
single-process reference. The children import the ktmoe this process imported (CI installs it; a source tree
has no native module) and run 1 OpenMP thread each."""
import os
import subprocess
import sys
from typing import List, Optional

import ktmoe

SRC = os.path.dirname(os.path.dirname(os.path.abspath(ktmoe.__file__)))
# what a launcher sets per rank: inherited from an outer torchrun they would mislead the children
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "KTMOE_TOPOLOGY")


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               OMP_NUM_THREADS="1")
    for k in _RANK_VARS:
        env.pop(k, None)
    return env


def launch(argv: List[str], nproc: Optional[int] = None, timeout: int = 300,
           check: bool = True) -> subprocess.CompletedProcess:
    """`python ARGV...` as nproc ranks under torchrun (nproc > 1), else as one process; with check, a non-zero
    exit fails the test with the end of the children's output."""
    runner = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if (nproc or 1) > 1 \
        else []
    proc = subprocess.run([sys.executable] + runner + list(argv), capture_output=True, text=True, env=child_env(),
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc
