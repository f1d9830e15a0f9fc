"""One sm90 attention call (after warm-up) for ncu / compute-sanitizer to look at.

    ncu --clock-control none --set full -k regex:attn --launch-skip 2 --launch-count 1 \
        python tools/profile_sm90.py --n 8192
    compute-sanitizer --tool memcheck python tools/profile_sm90.py --n 300 --b 1 --h 2 --causal
    compute-sanitizer --tool racecheck python tools/profile_sm90.py --n 300 --b 1 --h 2 --pv-accum one_level
    compute-sanitizer --tool memcheck python tools/profile_sm90.py --n 300 --b 1 --h 2 --causal --train

--quant-only: time the fused Q/K/V quantizer alone (CUDA events, median of --reps calls after
warm-up) and print its time and effective bandwidth. Two timings: the whole Python call
(``quantize_qkv_sm90``: allocation + binding + 3 launches) and the kernels alone
(``sage_core.quant_qkv_sm90_fused`` on preallocated outputs, calls queued back to back). Bytes counted: Q, K, V read once and
the int8 Q, K and E4M3 V^T written (the floor), plus, for the "actual" figure, K and V read a
second time by the statistics pass (K only without a given k_mean, which is the default).

    python tools/profile_sm90.py --quant-only --b 32 --n 1024      # 1k, 32k tokens x 32 heads
    python tools/profile_sm90.py --quant-only --b 8 --n 4096
    ncu --set full -k regex:quant_detail python tools/profile_sm90.py --quant-only --reps 1

--overhead: per-CTA fixed cost of the attention kernel (kernel only, CUDA events). The grid is
held at a whole number of waves of query tiles (128 rows, 192 at d=64) while s_kv grows; a least-squares line
time = a + t * kv_tiles (per wave) gives the fixed cost a in units of one 128x128 KV tile.

    python tools/profile_sm90.py --overhead
"""

import argparse
import statistics

import torch

import sage_core
from sage_torch.backends import sm90


def _time_queued_ms(fn, reps: int) -> float:
    """Mean time of reps back-to-back calls (no sync between them: host launch cost hidden)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def torch_profile(a, q, k, v) -> None:
    """Kernels of one whole sage attention call (quantization included), by CUDA time."""
    import sage_torch
    from torch.profiler import ProfilerActivity, profile

    def call():
        return sage_torch.attention(q, k, v, is_causal=a.causal)

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    print(f"torch profile b={a.b} h={a.h} n={a.n} d={a.d} causal={a.causal} (5 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def host_profile(a) -> None:
    """Host (CPU) cost of one whole sage_torch.attention call: tiny shapes so the GPU never
    limits, mean wall time per call, then a cProfile of the Python side (top by cumulative)."""
    import cProfile
    import pstats
    import time

    import sage_torch

    dtype = torch.float16 if a.fp16 else torch.bfloat16
    q, k, v = (torch.randn(1, 2, 128, a.d, device="cuda", dtype=dtype) for _ in range(3))
    calls = {
        "sage_torch.attention": lambda: sage_torch.attention(q, k, v, is_causal=a.causal),
        "sm90 backend fn": lambda: sm90.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout="bhsd", is_causal=a.causal,
                                                                    scale=a.d ** -0.5, return_lse=False),
        "quantize_qkv_sm90": lambda: sm90.quantize_qkv_sm90(q, k, v, layout="bhsd"),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=a.causal),
    }
    for name, fn in calls.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.reps):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"host {name:22s} {(t1 - t0) / a.reps * 1e6:8.1f} us per call (launch side, queued)")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(a.reps):
        calls["sage_torch.attention"]()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def _time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def quant_only(a, q, k, v) -> None:
    layout = "bhsd"
    smooth_v = not a.no_smooth_v
    qz = sm90.quantize_qkv_sm90(q, k, v, layout=layout, smooth_v=smooth_v)
    km = qz["k_mean"]
    vm = qz.get("v_mean")
    n_ws = sage_core.quant_qkv_sm90_workspace_size(a.b, a.h, a.n, a.d)
    ws = torch.empty((n_ws,), dtype=torch.float32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    extra = {} if vm is None else {"v_mean": vm, "v_mean_given": False}

    def kernels_only():  # DLPack capsules (~1 us each; Tensor.__dlpack__ costs ~10 us of host apiece)
        dl = sm90._dl
        sage_core.quant_qkv_sm90_fused(dl(q), dl(k), dl(v), dl(qz["q"]), dl(qz["q_scale"]), dl(qz["k"]),
                                       dl(qz["k_scale"]), dl(qz["v_t"]), dl(qz["v_scale"]), dl(km), False, dl(ws),
                                       stream, **{n: dl(t) if isinstance(t, torch.Tensor) else t
                                                  for n, t in extra.items()})

    def whole_call():
        sm90.quantize_qkv_sm90(q, k, v, layout=layout, smooth_v=smooth_v)

    elems = a.b * a.h * a.n * a.d
    floor_bytes = 3 * elems * q.element_size() + 3 * elems  # read Q, K, V; write int8 Q, K, e4m3 V^T
    # the tiles read K and V a second time (from L2 in the ordered launch, from DRAM in the 3-launch path)
    actual_bytes = floor_bytes + 2 * elems * q.element_size()
    # kernels only, queued back to back: the GPU time when the host keeps up (a single call between
    # two events also times the host issuing it: 155 us at b=1 h=24 n=4k with Tensor arguments)
    t_k = _time_queued_ms(kernels_only, a.reps)
    t_w = _time_ms(whole_call, a.reps)
    t_wq = _time_queued_ms(whole_call, a.reps)
    print(f"quantizer b={a.b} h={a.h} n={a.n} d={a.d} {q.dtype} smooth_v={smooth_v} (median of {a.reps})")
    for name, t in (("kernels, queued", t_k), ("python call", t_w), ("queued calls", t_wq)):
        print(f"  {name:13s} {t * 1e3:9.1f} us   floor {floor_bytes / t / 1e6:7.0f} GB/s   "
              f"actual {actual_bytes / t / 1e6:7.0f} GB/s")
    print(f"  floor bytes {floor_bytes / 1e6:.0f} MB, actual bytes {actual_bytes / 1e6:.0f} MB")


def overhead(a) -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype = torch.float16 if a.fp16 else torch.bfloat16
    block_q = 192 if a.d == 64 else 128  # query rows per CTA tile (three consumer warpgroups at d=64)
    waves, s_q = 16, 4 * block_q  # 4 query tiles per head
    heads = sms  # one head per SM: b * heads * (s_q / block_q) = waves * sms CTAs
    b = waves * sms // (heads * (s_q // block_q)) or 1
    pts = []
    for s_kv in (128, 256, 512, 1024, 2048, 4096):
        g = torch.Generator(device="cuda").manual_seed(s_kv)
        q = torch.randn(b, heads, s_q, a.d, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(b, heads, s_kv, a.d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        prepared, kernel = sm90.split_for_bench(q, k, v, is_causal=False)
        t = _time_queued_ms(lambda kernel=kernel, prepared=prepared: kernel(prepared), a.reps)
        ctas = b * heads * (s_q // block_q)
        per_wave_us = t * 1e3 / (ctas / sms)
        pts.append((s_kv // 128, per_wave_us))
        tops = 4.0 * b * heads * s_q * s_kv * a.d / t / 1e9
        print(f"  s_kv={s_kv:5d} kv_tiles={s_kv // 128:3d} CTAs={ctas} time {t * 1e3:8.1f} us  "
              f"per wave {per_wave_us:7.2f} us  {tops:6.0f} TOPS")
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    icpt = my - slope * mx
    print(f"overhead fit d={a.d}: per wave = {icpt:.2f} us + {slope:.3f} us x kv_tiles "
          f"-> fixed cost = {icpt / slope:.1f} KV tiles per CTA")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--h", type=int, default=32)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--quant-only", action="store_true", help="time the fused quantizer alone")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions (--quant-only)")
    p.add_argument("--no-smooth-v", action="store_true", help="--quant-only without V smoothing")
    p.add_argument("--fp16", action="store_true", help="fp16 inputs (default bf16)")
    p.add_argument("--overhead", action="store_true", help="fit the per-CTA fixed cost (kernel only)")
    p.add_argument("--torch-profile", action="store_true", help="kernels of a whole call, by CUDA time")
    p.add_argument("--host", action="store_true", help="host-side cost of a whole call (+ cProfile)")
    p.add_argument("--pv-accum", default="two_level", choices=["two_level", "one_level"],
                   help="the recipe option of the profiled call (one_level: its own kernels)")
    p.add_argument("--time", action="store_true",
                   help="also print the call's median time (CUDA events, --reps) and TOPS (halved if causal)")
    p.add_argument("--train", action="store_true",
                   help="the train_s8 kernels (sage_train.backends.sm90.forward / backward) instead of inference")
    a = p.parse_args()
    dtype = torch.float16 if a.fp16 else torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(a.b, a.h, a.n, a.d, device="cuda", dtype=dtype, generator=g)
               for _ in range(3))
    if a.quant_only:
        quant_only(a, q, k, v)
        return
    if a.overhead:
        overhead(a)
        return
    if a.host:
        host_profile(a)
        return
    if a.torch_profile:
        torch_profile(a, q, k, v)
        return
    if a.train:
        from sage_train.backends import sm90 as train_sm90

    def call():
        if a.train:
            return train_sm90.forward(q, k, v, layout="bhsd", is_causal=a.causal, scale=a.d ** -0.5,
                                      smooth_k=True)[0]
        return sm90.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout="bhsd", is_causal=a.causal,
                                                 scale=a.d ** -0.5, return_lse=False, pv_accum=a.pv_accum)[0]

    for _ in range(a.iters):
        o = call()
    torch.cuda.synchronize()
    print("ok", float(o.float().abs().mean()))
    if a.time:  # whole call: quantization and host time included
        t = _time_ms(call, a.reps)
        ops = 4.0 * a.b * a.h * a.n * a.n * a.d / (2 if a.causal else 1)
        print(f"{'train_s8' if a.train else 'qk_s8_pv_e4m3'} b={a.b} h={a.h} n={a.n} d={a.d} "
              f"causal={a.causal}: {t * 1e3:.1f} us, {ops / t / 1e9:.0f} TOPS end to end")
        if a.train:  # the forward kernel alone, on operands quantized once
            qz = train_sm90.quantize_forward(q, k, v, layout="bhsd", smooth_k=True)
            lse = torch.empty((a.b, a.h, a.n), dtype=torch.float32, device="cuda")
            stream = torch.cuda.current_stream().cuda_stream
            t = _time_ms(lambda: sage_core._C.attn_fwd_sm90_train_s8(
                qz["q"], qz["k"], qz["v_t"], qz["q_scale"], qz["k_scale"], qz["v_scale"], o, lse, a.n,
                a.d ** -0.5, a.causal, stream), a.reps)
            print(f"train_s8 forward kernel only: {t * 1e3:.1f} us, {ops / t / 1e9:.0f} TOPS")
            # the backward (2.5x the forward's ops): operand preparation, the two kernels, both
            o, lse = train_sm90.forward(q, k, v, layout="bhsd", is_causal=a.causal, scale=a.d ** -0.5, smooth_k=True)
            do = torch.randn_like(o)
            kw = dict(layout="bhsd", smooth_k=True)
            t_prep = _time_ms(lambda: train_sm90.quantize_backward(do, q, k, v, o, lse, **kw), a.reps)
            z = train_sm90.quantize_backward(do, q, k, v, o, lse, **kw)
            dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
            t_kern = _time_ms(lambda: sage_core._C.attn_bwd_sm90_train_s8(
                z["q"], z["q_t"], z["k"], z["k_t"], z["v"], z["dout"], z["do_t"], z["q_scale"], z["k_scale"],
                z["do_scale"], z["lse2"], z["delta"], dq, dk, dv, a.d ** -0.5, a.causal, stream,
                do_bad_last=z["do_bad_last"]), a.reps)
            t_all = _time_ms(lambda: train_sm90.backward(do, q, k, v, o, lse, is_causal=a.causal, scale=a.d ** -0.5,
                                                         **kw), a.reps)
            print(f"train_s8 backward: operands {t_prep * 1e3:.1f} us, kernels (dK/dV + dQ) {t_kern * 1e3:.1f} us "
                  f"= {2.5 * ops / t_kern / 1e9:.0f} TOPS, end to end {t_all * 1e3:.1f} us = "
                  f"{2.5 * ops / t_all / 1e9:.0f} TOPS")


if __name__ == "__main__":
    main()
