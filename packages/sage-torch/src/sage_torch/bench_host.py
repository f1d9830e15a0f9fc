"""Host cost and auto's routing rule: ``python -m sage_torch.bench_host [--out DIR]``.

Two measurements, both against PyTorch's default SDPA in the same run:

* **Per call in a loop** (``--loop``, default 1000 calls): wall time per call of a tight Python
  loop, synchronized once at the end, so launch-bound shapes show host cost; the calls run as
  ``REPS`` alternating loops per variant (SDPA, auto, kernel, SDPA, ...), median per variant. Rows: SDPA
  (default backend), ``sage_torch.attention`` with ``recipe="auto"`` and with the kernel recipe
  forced (``qk_s8_pv_e4m3`` on sm90), so a route to SDPA can never hide a slow kernel.
* **Crossover sweep**: per-call time of the forced kernel path vs SDPA over query lengths and
  problem sizes, the data behind ``sage_torch._dispatch.AUTO_TORCH_RULES``.

Writes ``host.json`` (device, torch, commit, command) and prints a table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from . import api
from .bench import commit
from ._dispatch import AUTO_TORCH_RULES, device_arch

KERNEL_RECIPE = {"sm90": "qk_s8_pv_e4m3"}
#: alternating timed loops per row (their median is the row's figure)
REPS = 5




def per_call_us(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def host_only_us(fn, calls: int = 150) -> float:
    """Host (Python + C++ + launch) time per call: the calls are issued behind a long GPU sleep,
    so the GPU never waits for them and the loop measures only the CPU side (150 calls stay
    well inside the launch queue)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~100 ms of GPU time at 1.98 GHz: longer than the loop
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


def _inputs(b, h_q, h_kv, s_q, s_kv, d, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h_q, s_q, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(b, h_kv, s_kv, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(b, h_kv, s_kv, d, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _row(name, b, h_q, h_kv, s_q, s_kv, d, causal, calls, recipe):
    q, k, v = _inputs(b, h_q, h_kv, s_q, s_kv, d)
    gqa = h_q != h_kv
    sdpa_causal = causal and s_q == s_kv  # PyTorch's is_causal is top-left otherwise

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=sdpa_causal, enable_gqa=gqa)

    def auto():
        return api.attention(q, k, v, is_causal=sdpa_causal)

    def kernel():
        return api.attention(q, k, v, is_causal=sdpa_causal, recipe=recipe)

    with torch.inference_mode():
        # REPS alternating loops of calls/REPS each, median per variant: one slow stretch (clock or
        # CPU frequency ramp, another process) then moves one of REPS loops, not a whole row.
        loops = {"sdpa": [], "auto": [], "kernel": []}
        for _ in range(REPS):
            loops["sdpa"].append(per_call_us(sdpa, max(1, calls // REPS)))
            loops["auto"].append(per_call_us(auto, max(1, calls // REPS)))
            if recipe:
                loops["kernel"].append(per_call_us(kernel, max(1, calls // REPS)))
        t_sdpa = statistics.median(loops["sdpa"])
        t_auto = statistics.median(loops["auto"])
        t_kernel = statistics.median(loops["kernel"]) if recipe else float("nan")
        h_sdpa = host_only_us(sdpa)
        h_kernel = host_only_us(kernel) if recipe else float("nan")
    return {"host_sdpa_us": h_sdpa, "host_kernel_us": h_kernel, "name": name, "b": b, "h_q": h_q, "h_kv": h_kv, "s_q": s_q, "s_kv": s_kv, "d": d,
            "causal": causal, "calls": calls, "sdpa_us": t_sdpa, "auto_us": t_auto, "kernel_us": t_kernel,
            "auto_over_sdpa": t_auto / t_sdpa, "kernel_over_sdpa": t_kernel / t_sdpa}


LOOP_SHAPES = [
    # name, b, h_q, h_kv, s_q, s_kv, d, causal
    ("launch-bound (issue 8 host floor)", 1, 8, 8, 128, 128, 64, False),
    ("tiny d128", 1, 16, 16, 128, 128, 128, False),
    ("decode b8 kv8k", 8, 32, 8, 1, 8192, 128, False),
    ("decode b1 kv4k q16", 1, 32, 8, 16, 4096, 128, False),
    ("llama 1k causal", 1, 32, 8, 1024, 1024, 128, True),
    ("llama 4k causal", 1, 32, 8, 4096, 4096, 128, True),
    ("dit 4k", 1, 24, 24, 4096, 4096, 128, False),
    ("b1 h8 n1k d64", 1, 8, 8, 1024, 1024, 64, False),
    ("b1 h8 n2k d64", 1, 8, 8, 2048, 2048, 64, False),
]


def sweep_shapes():
    out = []
    for d in (64, 128):
        for h in (8, 32):
            for n in (128, 256, 512, 1024, 2048):
                for causal in (False, True):
                    out.append((f"sweep h{h} n{n} d{d}{' causal' if causal else ''}", 1, h, h, n, n, d, causal))
    for s_q in (1, 4, 16, 32, 64, 128):
        out.append((f"sweep decode q{s_q} kv4k", 4, 32, 8, s_q, 4096, 128, False))
    return out


def profile_host(recipe: str) -> None:
    """Where the host time of one forced-kernel call goes: the bare sage_core call (capsules made
    once), the backend's fast path, attention(), and a cProfile of attention() by own time."""
    import cProfile
    import pstats

    from torch.utils.dlpack import to_dlpack

    from .backends import sm90

    q, k, v = _inputs(1, 8, 8, 128, 128, 64)
    o = torch.empty_like(q)
    n_ws = sm90._ONE_CALL_WS(1, 8, 128, 8, 128, 64)
    ws = torch.empty((n_ws,), dtype=torch.uint8, device="cuda")
    caps = [to_dlpack(t) for t in (q, k, v, o)]
    stream = torch.cuda.current_stream().cuda_stream

    def bare():  # a capsule is consumed once: make fresh ones (to_dlpack ~1 us each) per call
        sm90._ONE_CALL(to_dlpack(q), to_dlpack(k), to_dlpack(v), to_dlpack(o), None, to_dlpack(ws), 0.125,
                       False, True, True, stream)

    del caps
    with torch.inference_mode():
        for name, fn in (("sage_core call (+5 to_dlpack)", bare),
                         ("backend fast path", lambda: sm90._fast(q, k, v, "bhsd", False, 0.125)),
                         ("attention(recipe=kernel)", lambda: api.attention(q, k, v, recipe=recipe)),
                         ("5x to_dlpack", lambda: [to_dlpack(t) for t in (q, k, v, o, ws)]),
                         ("2x torch.empty", lambda: (torch.empty_like(q), torch.empty((n_ws,), dtype=torch.uint8,
                                                                                        device="cuda")))):
            print(f"[profile] {name:32s} host-only {host_only_us(fn):6.1f} us per call")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(2000):
            api.attention(q, k, v, recipe=recipe)
        pr.disable()
        torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(12)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sage_torch.bench_host", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("SAGE_BENCH_OUT", "bench-out"))
    p.add_argument("--loop", type=int, default=1000, help="calls per timed loop")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--profile", action="store_true", help="only: where the host time of one call goes")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_host: no CUDA GPU visible; nothing timed (host cost is only meaningful on a GPU)")
        return 0
    # clocks ramp from idle (345 MHz seen) over the first ~second: keep the GPU busy first
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + 2.0
    while time.perf_counter() < t_end:
        x @ x
        torch.cuda.synchronize()
    del x
    arch = device_arch(torch.device("cuda"))
    recipe = KERNEL_RECIPE.get(arch)
    if a.profile:
        profile_host(recipe)
        return 0
    rows = []
    shapes = LOOP_SHAPES + ([] if a.no_sweep else sweep_shapes())
    for shape in shapes:
        calls = a.loop if shape[0] in [s[0] for s in LOOP_SHAPES] else max(50, a.loop // 5)
        try:
            r = _row(*shape, calls=calls, recipe=recipe)
        except Exception as exc:  # noqa: BLE001 - one shape failing must not lose the rest
            r = {"name": shape[0], "error": f"{type(exc).__name__}: {exc}"}
        rows.append(r)
        if "error" in r:
            print(f"{r['name']:40s} ERROR {r['error']}")
        else:
            print(f"{r['name']:40s} sdpa {r['sdpa_us']:8.1f} us  auto {r['auto_us']:8.1f} "
                  f"({r['auto_over_sdpa']:.2f}x)  kernel {r['kernel_us']:8.1f} ({r['kernel_over_sdpa']:.2f}x)"
                  f"  host-only: sdpa {r['host_sdpa_us']:.1f} kernel {r['host_kernel_us']:.1f}")
    result = {"device": torch.cuda.get_device_name(), "arch": arch, "torch": torch.__version__,
              "commit": commit(), "command": " ".join([sys.executable, "-m", "sage_torch.bench_host"] +
                                                       (argv if argv is not None else sys.argv[1:])),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "auto_rules": AUTO_TORCH_RULES, "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "host.json"), "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
