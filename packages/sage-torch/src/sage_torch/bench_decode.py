"""Decode benchmark: ``python -m sage_torch.bench_decode [--out DIR]`` (issue 11).

One query token per sequence (GQA: 32 query / 8 kv heads, head dim 128, bf16 by default) against
a KV cache of ``kv`` tokens, batch 1 .. 64, kv 1k .. 32k, in the same run:

* ``sdpa``: PyTorch's SDPA (default backend) over a bf16 cache held as preallocated
  ``(b, h_kv, capacity, d)`` tensors and sliced to the length (a static cache, no copy);
* ``sage``: :meth:`sage_torch.QuantizedKVCache.attention` over the INT8 cache (the
  ``sage_core.decode_s8`` kernel);
* ``step``: one decode step with the cache update, ``sdpa`` writing the new token's K/V into its
  bf16 cache, ``sage`` appending (quantizing) it into the INT8 cache.

Time per call: CUDA events around ``--calls`` back-to-back calls (so host time counts where it is
the bound), median of ``--reps`` alternating loops. Accuracy: rel-L1 of each output against
float64 attention over the unquantized cache. Writes ``decode.json`` and ``decode.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

from .bench import commit
from .kvcache import QuantizedKVCache




def _loop_us(fn, calls: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _timed(fns: dict, calls: int, reps: int) -> dict:
    for fn in fns.values():
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(_loop_us(fn, calls))
    return {k: statistics.median(v) for k, v in out.items()}


def run_case(b: int, kv: int, h_q: int, h_kv: int, d: int, dtype: torch.dtype, calls: int, reps: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(b * 100003 + kv)
    cap = kv + 64
    k_full = torch.randn(b, h_kv, cap, d, device="cuda", generator=g).to(dtype)
    v_full = torch.randn(b, h_kv, cap, d, device="cuda", generator=g).to(dtype)
    q = torch.randn(b, h_q, 1, d, device="cuda", generator=g).to(dtype)
    cache = QuantizedKVCache(b, h_kv, d, cap, device="cuda", dtype=dtype, strict=True)
    cache.append(k_full[:, :, :kv], v_full[:, :, :kv])
    k_new, v_new = k_full[:, :, kv:kv + 1], v_full[:, :, kv:kv + 1]
    gqa = h_q != h_kv

    def sdpa():
        return F.scaled_dot_product_attention(q, k_full[:, :, :kv], v_full[:, :, :kv], enable_gqa=gqa)

    def sage():
        return cache.attention(q, is_causal=False)

    def sdpa_step():  # the static cache's update of the last slot, then attention
        k_full[:, :, kv:kv + 1].copy_(k_new)
        v_full[:, :, kv:kv + 1].copy_(v_new)
        return F.scaled_dot_product_attention(q, k_full[:, :, :kv + 1], v_full[:, :, :kv + 1], enable_gqa=gqa)

    def sage_step():
        cache.length = kv  # re-append the same slot every call (the timing of one step)
        cache.append(k_new, v_new)
        return cache.attention(q, is_causal=False)

    with torch.inference_mode():
        ref = torch.cat([F.scaled_dot_product_attention(q[i:i + 1].double(), k_full[i:i + 1, :, :kv].double(),
                                                        v_full[i:i + 1, :, :kv].double(), enable_gqa=gqa)
                         for i in range(b)])  # one sequence at a time: float64 GQA expands K/V per head
        rel = {name: float((fn().double() - ref).abs().sum() / ref.abs().sum()) for name, fn in
               (("sdpa", sdpa), ("sage", sage))}
        t = _timed({"sdpa": sdpa, "sage": sage, "sdpa_step": sdpa_step, "sage_step": sage_step}, calls, reps)
    cache.length = kv
    row = {"b": b, "kv": kv, "h_q": h_q, "h_kv": h_kv, "d": d, "dtype": str(dtype).replace("torch.", ""),
           "sdpa_us": t["sdpa"], "sage_us": t["sage"], "speedup": t["sdpa"] / t["sage"],
           "sdpa_step_us": t["sdpa_step"], "sage_step_us": t["sage_step"],
           "step_speedup": t["sdpa_step"] / t["sage_step"],
           "rel_l1_sdpa": rel["sdpa"], "rel_l1_sage": rel["sage"],
           "cache_bytes_bf16": 2 * k_full[:, :, :kv].numel() * k_full.element_size(),
           "cache_bytes_int8": 2 * (b * h_kv * kv * (d + 4))}
    row["sage_gbps"] = row["cache_bytes_int8"] / (t["sage"] * 1e3)
    row["sdpa_gbps"] = row["cache_bytes_bf16"] / (t["sdpa"] * 1e3)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--kv", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("H_Q", "H_KV"))
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="bench-out/decode")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("[bench_decode] no CUDA GPU: nothing timed (the CPU tests cover the emulation)")
        return 0
    dtype = torch.float16 if a.fp16 else torch.bfloat16
    rows = []
    for b in a.batch:
        for kv in a.kv:
            try:
                r = run_case(b, kv, a.heads[0], a.heads[1], a.d, dtype, a.calls, a.reps)
            except torch.OutOfMemoryError as exc:  # a row, not the end of the run
                print(f"b={b:3d} kv={kv:6d}  skipped: {str(exc).splitlines()[0]}", flush=True)
                continue
            finally:
                torch.cuda.empty_cache()  # the case's caches are gone: give their memory back
            rows.append(r)
            print(f"b={b:3d} kv={kv:6d}  sdpa {r['sdpa_us']:8.1f} us  sage {r['sage_us']:8.1f} us  "
                  f"{r['speedup']:5.2f}x  ({r['sage_gbps']:5.0f} GB/s int8 vs {r['sdpa_gbps']:5.0f} bf16)  "
                  f"step {r['step_speedup']:5.2f}x  rel-L1 sdpa {r['rel_l1_sdpa']:.1e} sage {r['rel_l1_sage']:.1e}",
                  flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit(),
            "command": "python -m sage_torch.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "decode.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}; `{meta['command']}`", "",
             "| b | kv | sdpa us | sage us | speedup | step (append + attention) speedup | sage GB/s (int8) | "
             "sdpa GB/s (bf16) | rel-L1 sdpa / sage |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['b']} | {r['kv']} | {r['sdpa_us']:.1f} | {r['sage_us']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['step_speedup']:.2f}x | {r['sage_gbps']:.0f} | {r['sdpa_gbps']:.0f} | "
                     f"{r['rel_l1_sdpa']:.1e} / {r['rel_l1_sage']:.1e} |")
    with open(os.path.join(a.out, "decode.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
