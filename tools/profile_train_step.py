"""Where one sage_train forward+backward at the train_check shape spends its time (issue 10):
the wall time per call and the torch profiler's tables by GPU and by CPU time.

    python tools/profile_train_step.py [--b 16 --h 8 --n 512 --d 64] [--no-causal]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import sage_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=16)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--no-causal", action="store_true")
    a = p.parse_args()
    shape = (a.b, a.h, a.n, a.d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        sage_train.attention(q, k, v, is_causal=not a.no_causal).backward(do)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    print(f"wall per forward+backward: {(time.perf_counter() - t0) / 20 * 1e3:.3f} ms "
          f"({sage_train.kernel_module_status()})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    print(avg.table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(avg.table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
