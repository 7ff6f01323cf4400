"""Launching `cli.py` as several ranks of a torch.distributed job on this machine, as torchrun would (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), without torchrun's agent in between: a test sees each rank's exit
code and output, and may make one rank die (SIGKILL) when pass 2 reaches a layer. Tests only."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BOOT = """
import json, os, signal, sys
argv, die = json.loads(sys.argv[1]), json.loads(sys.argv[2])
if die and int(os.environ["RANK"]) == die["rank"]:
    from compressor.apply_plan import QuantizePass
    real = QuantizePass._quantize_block
    def dying(self, b, *args, **kwargs):
        if b.layer_idx == die["layer"]:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, b, *args, **kwargs)
    QuantizePass._quantize_block = dying
import torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ["REPO"])
import cli
sys.exit(cli.main(argv))
"""


@dataclass
class Rank:
    code: int
    out: str
    err: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(n: int, argv: list[str], env: dict[str, str] | None = None, die: dict | None = None,
              timeout: float = 120) -> tuple[list[Rank], float]:
    """Every rank's exit code and output, and the wall seconds until the last one exited. `die`: {"rank": r, "layer":
    i} kills rank r (SIGKILL) when pass 2 reaches layer i."""
    base = {**os.environ, **(env or {}), "REPO": str(REPO), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
            "WORLD_SIZE": str(n), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", BOOT, json.dumps(argv), json.dumps(die)], cwd=REPO,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(n)]
    ranks = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"the ranks did not finish within {timeout} s (a hang)") from None
        ranks.append(Rank(p.returncode, out, err))
    return ranks, time.time() - t0
