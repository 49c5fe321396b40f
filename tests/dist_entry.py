"""Run under torchrun by tests/test_reliability.py: a frozen peer must not make the others wait.

Rank 1 joins the process group and then hangs (sleeps) instead of aggregating; rank 0 runs
``aggregate(distributed=True, timeout=MINUTES)`` and must fail with an error naming itself once the
timeout has passed. Prints ``RANK0-ERROR: <message>`` and exits 3 on rank 0.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import agg_entry
import conductance as cd
from conductance.aggregate import init_distributed

if __name__ == "__main__":
    torch.set_num_threads(1)
    minutes = float(sys.argv[1])
    rank, world = init_distributed(backend="gloo", timeout=minutes)
    if rank == 1:
        time.sleep(float(os.environ.get("FROZEN_SECONDS", 60)))
        print("RANK1-WOKE", flush=True)      # never printed when rank 0 failed first (torchrun stops us)
        sys.exit(0)
    try:
        cd.aggregate(agg_entry.model(), agg_entry.data(), ["0"], distributed=True, n_steps=4, timeout=minutes)
    except cd.ConductanceError as exc:
        print(f"RANK0-ERROR: {exc}", flush=True)
        sys.exit(3)
    print("RANK0-NO-ERROR", flush=True)
