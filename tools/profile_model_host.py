"""Where a DiT-style forward's time goes with and without sage's SDPA drop-in (issue 8).

bench_models reports the sage variant's host time per forward ~0.75 ms above SDPA's at every
size (4 attention calls), and 0.97x at 4k where every call is routed to PyTorch's own SDPA.
This separates, at one size: host time per forward (perf_counter, no sync inside), GPU time
(CUDA events), each attention call's host time alone, the CUDA kernels of one forward by GPU time
(torch.profiler), and a cProfile of the drop-in's Python.

    python tools/profile_model_host.py --n 4096
"""

import argparse
import cProfile
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import sage_torch
from sage_torch.bench_models import DIT_FULL, DiTStack


def timed(fn, iters):
    host, gpu = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        start.record()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(gpu)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--iters", type=int, default=30)
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = DIT_FULL
    model = DiTStack(cfg["blocks"], cfg["width"], cfg["heads"], cfg["mlp_ratio"]).cuda().to(torch.bfloat16)
    x = torch.randn(1, a.n, cfg["width"], device="cuda", dtype=torch.bfloat16)
    # one attention call's inputs, as the block makes them (strided views of a packed qkv)
    qkv = torch.randn(1, a.n, 3, cfg["heads"], cfg["width"] // cfg["heads"], device="cuda",
                      dtype=torch.bfloat16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    with torch.inference_mode():
        for name, ctx in (("sdpa", None), ("sage", sage_torch.patch_sdpa), ("sdpa", None), ("sage", sage_torch.patch_sdpa)):
            patch = ctx() if ctx else None
            try:
                for _ in range(3):
                    model(x)
                h, g = timed(lambda: model(x), a.iters)
                ha, ga = timed(lambda: F.scaled_dot_product_attention(q, k, v), a.iters)
                t0 = time.perf_counter()
                for _ in range(200):
                    F.scaled_dot_product_attention(q, k, v)
                issue_us = (time.perf_counter() - t0) / 200 * 1e6  # queued: includes any blocking
                torch.cuda.synchronize()
            finally:
                if patch:
                    patch.restore()
            print(f"{name}: forward host {h:.3f} ms, GPU {g:.3f} ms | one attention call host {ha * 1e3:.1f} us, "
                  f"GPU {ga * 1e3:.1f} us, 200 queued calls {issue_us:.1f} us each")
        for name, ctx in (("sdpa", None), ("sage", sage_torch.patch_sdpa)):
            patch = ctx() if ctx else None
            try:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        model(x)
                    torch.cuda.synchronize()
                print(f"--- {name}: one forward's ops (3 forwards), by self CPU time")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=70))
                print(f"--- {name}: by CUDA time")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=70))
                if name == "sage":
                    pr = cProfile.Profile()
                    pr.enable()
                    for _ in range(20):
                        model(x)
                    pr.disable()
                    torch.cuda.synchronize()
                    pstats.Stats(pr).sort_stats("tottime").print_stats(15)
            finally:
                if patch:
                    patch.restore()


if __name__ == "__main__":
    main()
