"""Attention benchmark: sage kernels vs PyTorch SDPA (flash, cuDNN) in one run.

    python -m sage_torch.bench [--d 64 128] [--n 1024 ... 32768] [--causal both] [--out DIR]
    python -m sage_torch.bench --d 32 80 96 [...]     head dims the kernels run zero-padded

On a GPU: TOPS (4·b·h·n_q·n_k·d / time, halved for causal) with quantization included
("end to end") and, where the backend exposes it, kernel only; accuracy (cos, rel-L1, RMSE) of
every impl vs float64 attention on the same inputs (a strided sample of query rows of one
batch and two heads, all keys). A head dim that sage runs zero-padded to a kernel's
(``sage_torch._head_dim``: 32 -> 64, 80/96 -> 128) counts the call's d in its TOPS (the useful
work), so the padded kernel's extra work shows as lower TOPS next to SDPA's; its sage rows also
carry ``padded_to``, the kernel-only time at the padded d and, where the backend pads copies,
``pad_ms``, the padding alone (zero-padded copies of q, k, v and the slice of o back into q's
order; the sm90 backend zero-fills inside its quantizer instead: no ``pad_ms``). A recipe forced with
``--recipes`` (``family/recipe``, e.g. ``sm80/qk_s8_pv_e4m3``, runs that family's backend directly:
the SageAttention-shaped mma.sync kernels on a Hopper) says which backend ran it and whether its
tensor-core instructions are native on this GPU (``backend``, ``native``, ``emulated``: the sm80 mma.sync family on Hopper emulates FP8 and INT4
mma.sync), also in the table. The timed callables of a shape run interleaved in rotated rounds
(:func:`time_cuda_interleaved`). Writes ``bench.json``
(device, versions, commit, one row per impl/d/causal/n) and ``bench.png``. Without a GPU it says
so and runs the CPU emulation on a small problem instead, so the command still shows what each
recipe's accuracy is (at ``--d``; for a padded head dim also how far the emulation of the padded
call, what the kernel computes, is from the emulation at d).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

TOKENS_BELOW_8K = 32 * 1024  # b·n held at 32k tokens below n = 8k (BENCHMARKING.md)
HEADS = 32
ACC_ROWS = 256  # query rows sampled for the float64 check
FORCED_RECIPES: list[str] = []  # set by --recipes ("recipe" or "recipe:opt=val,opt=val")


def parse_forced(spec: str) -> tuple[str, dict[str, object]]:
    """``"qk_s8_pv_f16:pv_accum=f16_buffer"`` -> ``("qk_s8_pv_f16", {"pv_accum": "f16_buffer"})``.

    Values are ints, floats, ``true``/``false``/``none`` or strings."""
    recipe, _, opts = spec.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, opts.split(",")):
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--recipes: expected opt=value in {spec!r}, got {item!r}")
        low = raw.lower()
        value: object = {"true": True, "false": False, "none": None}.get(low, raw)
        if value is raw:
            for conv in (int, float):
                try:
                    value = conv(raw)
                    break
                except ValueError:
                    pass
        options[key] = value
    return recipe, options


def batch_for(n: int) -> int:
    if n < 8192:
        return max(1, TOKENS_BELOW_8K // n)
    return 1 if n >= 32768 else 4


def commit() -> str:
    """``SAGE_COMMIT``, else ``git rev-parse --short HEAD`` of the current directory, else of this
    file's checkout (every benchmark of the package records its commit with this)."""
    if os.environ.get("SAGE_COMMIT"):
        return os.environ["SAGE_COMMIT"]
    for cwd in (None, pathlib.Path(__file__).resolve().parent):
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  check=True, cwd=cwd).stdout.strip()
        except Exception:  # noqa: BLE001 - not a checkout
            continue
    return "unknown"


def time_cuda(fn: Callable[..., object], *args, warmup: int = 5, iters: int = 20) -> float:
    """Median milliseconds of fn(*args) over iters runs, CUDA events, after warmup runs."""
    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def time_cuda_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 5, rounds: int = 4,
                          per_round: int = 5) -> dict[str, float]:
    """Median milliseconds per callable, CUDA events, the callables interleaved: after ``warmup``
    calls each, ``rounds`` rounds of ``per_round`` timed calls each, the order rotated by one per
    round. A clock drift over the shape's measurement (the first callable timed after a heavy one,
    a thermal ramp) then falls on every callable alike instead of on the one timed first or last."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            for _ in range(per_round):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
    out = {}
    for name, times in samples.items():
        times.sort()
        out[name] = times[len(times) // 2]
    return out


def reference_rows(q, k, v, rows, is_causal):
    """float64 attention for the sampled query rows of batch 0, heads 0-1 (bhsd)."""
    qs = q[0, :2, rows].double()
    ks, vs = k[0, :2].double(), v[0, :2].double()
    s = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if is_causal:
        n_q, n_k = q.shape[2], k.shape[2]
        j = torch.arange(n_k, device=q.device)
        mask = j[None, :] > (rows[:, None] + n_k - n_q)
        s = s.masked_fill(mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ vs


def accuracy(out, ref, rows):
    from sage_quant import metrics

    o = out[0, :2, rows].double()
    return {k: float(v) for k, v in metrics.accuracy(o, ref).items()}


def sdpa_impl(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v, is_causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return run


def sage_impls() -> dict[str, dict]:
    """sage backends available on this device: name -> {e2e, split (optional)}."""
    import sage_torch

    impls = {}
    try:
        from sage_torch.backends import sm90  # noqa: F401
        mod = sm90
    except Exception as exc:  # noqa: BLE001 - report and go on
        print(f"[bench] sm90 backend unavailable: {exc}")
        mod = None

    def e2e(q, k, v, is_causal):
        return sage_torch.attention(q, k, v, is_causal=is_causal, recipe="auto")

    # zero_fill: the backend runs padded head dims without copies (the quantizer zero-fills), so the
    # kernel-only column runs on the call's own tensors and there is no padding time to report
    impls["sage"] = {"e2e": e2e, "split": getattr(mod, "split_for_bench", None),
                     "zero_fill": bool(getattr(mod, "ZERO_FILL", False))}
    # Recipes forced onto their own kernels (strict: never the emulation, never a fallback); a
    # "family/recipe" spec (sm80/qk_s8_pv_e4m3) runs that family's backend directly, e.g. the mma.sync
    # kernels on a Hopper, where dispatch would pick the wgmma kernel for the recipe.
    for spec in FORCED_RECIPES:
        recipe, options = parse_forced(spec)
        family, _, recipe = recipe.rpartition("/")
        if family:
            forced = _family_impl(family, recipe, options)
        else:
            def forced(q, k, v, is_causal, recipe=recipe, options=options):
                return sage_torch.attention(q, k, v, is_causal=is_causal, recipe=recipe, strict=True, **options)

        name = f"sage_{family + '/' if family else ''}{recipe}" + "".join(f"[{k}={v}]" for k, v in options.items())
        impls[name] = {"e2e": forced, "recipe": recipe, "family": family or None}
    return impls


def _family_impl(family: str, recipe: str, options: dict):
    """The backend ``{family}_{recipe}`` called directly (its ``supports`` checked first: a call it
    declines is an error row, never a fallback)."""
    from .backends import load_backend_modules, registered_backends

    load_backend_modules()  # registered lazily, on the first dispatch
    name = f"{family}_{recipe}"
    spec = next((b for b in registered_backends() if b.name == name), None)
    if spec is None:
        raise ValueError(f"--recipes {family}/{recipe}: no backend {name!r} is registered")

    def run(q, k, v, is_causal):
        kwargs = {"layout": "bhsd", "is_causal": is_causal, "scale": q.shape[-1] ** -0.5, "return_lse": False}
        why = spec.supports(q, k, v, **kwargs, **options) if spec.supports is not None else None
        if why is not None or not spec.available():
            raise RuntimeError(f"backend {name} cannot run this call: {why or 'not available'}")
        return spec.fn(q, k, v, **kwargs, **options)[0]

    return run


def instruction_note(recipe: str, q: torch.Tensor, family: str | None = None) -> dict:
    """Which backend runs a forced recipe here and whether its tensor-core instructions are native on
    this GPU: ``{"backend": ..., "native": bool, "emulated": [...]}`` (the sm80 mma.sync family on
    Hopper emulates FP8 and INT4 mma.sync; the wgmma kernels are native), so a table never passes an
    emulation's speed off as the kernel's."""
    from . import _dispatch

    arch = _dispatch.device_arch(q.device)
    if family is not None:
        backend = f"{family}_{recipe}"
    else:
        try:
            decision = _dispatch.resolve(arch, q.dtype, q.shape[-1], recipe, strict=False)
        except Exception as exc:  # noqa: BLE001 - the row's own run reports the failure
            return {"backend": f"unresolved ({type(exc).__name__})"}
        if decision.kind != _dispatch.KIND_KERNEL or decision.backend is None:
            return {"backend": decision.kind}
        backend = decision.backend.name
    emulated: tuple[str, ...] = ()
    if backend.startswith("sm80_"):
        from .backends import sm80

        emulated = sm80.emulated_mmas(recipe, arch)
    return {"backend": backend, "native": not emulated, "emulated": list(emulated)}


def padding_for_bench(q, k, v, d_kernel: int):
    """(padded q, k, v, pad_fn) for a call of head dim ``q.shape[-1]`` run at ``d_kernel``: the inputs
    the kernel sees (for the kernel-only column) and ``pad_fn()``, which redoes the whole padding
    work of one call (the three zero-padded copies and the slice of o back) for timing it alone."""
    from ._head_dim import PaddedCall

    qp, kp, vp = PaddedCall(q, k, v, "bhsd", d_kernel).inputs()
    o_padded = torch.empty_like(qp)

    def pad_fn():
        call = PaddedCall(q, k, v, "bhsd", d_kernel)
        call.inputs()
        return call.output(o_padded)

    return qp, kp, vp, pad_fn


def bench_gpu(args) -> list[dict]:
    from ._head_dim import kernel_head_dim

    rows_out = []
    impls = {"sdpa_flash": {"e2e": sdpa_impl("flash")}, "sdpa_cudnn": {"e2e": sdpa_impl("cudnn")}}
    impls.update(sage_impls())
    for d in args.d:
        for causal in args.causal:
            for n in args.n:
                b = batch_for(n)
                gen = torch.Generator(device="cuda").manual_seed(1000 + n + d)
                shape = (b, HEADS, n, d)
                q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
                           for _ in range(3))
                rows = torch.linspace(0, n - 1, min(ACC_ROWS, n), device="cuda").long()
                ref = reference_rows(q, k, v, rows, causal)
                flops = 4.0 * b * HEADS * n * n * d * (0.5 if causal else 1.0)  # the call's d: useful work
                d_kernel = kernel_head_dim(d)
                padded = d_kernel is not None and d_kernel != d
                # Correctness and preparation per impl first, then every timed callable of the
                # shape (end to end, kernel only, padding) interleaved in rotated rounds.
                shape_rows, timed = {}, {}
                for name, impl in impls.items():
                    row = {"impl": name, "d": d, "causal": causal, "n": n, "b": b, "h": HEADS}
                    if padded and name.startswith("sage"):
                        row["padded_to"] = d_kernel
                    if impl.get("recipe"):
                        row.update(instruction_note(impl["recipe"], q, impl.get("family")))
                    shape_rows[name] = row
                    try:
                        out = torch.full_like(q, float("nan"))
                        out = impl["e2e"](q, k, v, causal)
                        if isinstance(out, tuple):
                            out = out[0]
                        row.update(accuracy(out, ref, rows))
                        del out
                        timed[(name, "ms")] = lambda impl=impl, q=q, k=k, v=v, causal=causal: impl["e2e"](q, k, v, causal)
                        if impl.get("split") and d_kernel is not None:
                            if padded and not impl.get("zero_fill"):  # the kernel at d_kernel on padded copies
                                qp, kp, vp, pad_fn = padding_for_bench(q, k, v, d_kernel)
                                timed[(name, "pad_ms")] = pad_fn
                                prepared, kernel = impl["split"](qp, kp, vp, is_causal=causal, scale=d ** -0.5)
                            else:
                                prepared, kernel = impl["split"](q, k, v, is_causal=causal)
                            timed[(name, "kernel_ms")] = lambda kernel=kernel, prepared=prepared: kernel(prepared)
                    except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                try:
                    times = time_cuda_interleaved(timed)
                except Exception:  # noqa: BLE001 - then time them one by one, to see which fails
                    times = {}
                    for key, fn in timed.items():
                        try:
                            times.update(time_cuda_interleaved({key: fn}))
                        except Exception as exc_one:  # noqa: BLE001
                            shape_rows[key[0]]["error"] = f"{type(exc_one).__name__}: {exc_one}"[:300]
                for (name, field), ms in times.items():
                    row = shape_rows[name]
                    row[field] = ms
                    if field == "ms":
                        row["tops"] = flops / ms / 1e9
                    elif field == "kernel_ms":
                        row["kernel_tops"] = flops / ms / 1e9
                for row in shape_rows.values():
                    rows_out.append(row)
                    print(json.dumps(row), flush=True)
                timed.clear()
                del q, k, v
                torch.cuda.empty_cache()
    return rows_out


def print_table(rows: list[dict]) -> str:
    lines = []
    for d in sorted({r["d"] for r in rows}):
        for causal in (False, True):
            sub = [r for r in rows if r["d"] == d and r["causal"] == causal]
            if not sub:
                continue
            ns = sorted({r["n"] for r in sub})
            padded_to = next((r["padded_to"] for r in sub if "padded_to" in r), None)
            pad_note = f", sage zero-padded to d={padded_to}" if padded_to else ""
            lines.append(f"\nd={d} {'causal' if causal else 'non-causal'} (TOPS at d; kernel-only in []{pad_note})")
            lines.append("| impl | " + " | ".join(f"{n // 1024}k" for n in ns) + " | rel-L1 @max n |"
                         + (" padding % of e2e @max n |" if padded_to else ""))
            lines.append("|---" * (len(ns) + 2 + (1 if padded_to else 0)) + "|")
            for impl in dict.fromkeys(r["impl"] for r in sub):
                cells = []
                last = None
                for n in ns:
                    r = next((x for x in sub if x["impl"] == impl and x["n"] == n), None)
                    if r is None or "tops" not in r:
                        cells.append("err" if r and "error" in r else "-")
                        continue
                    c = f"{r['tops']:.0f}"
                    if "kernel_tops" in r:
                        c += f" [{r['kernel_tops']:.0f}]"
                    cells.append(c)
                    last = r
                acc = f"{last['rel_l1']:.4f}" if last and "rel_l1" in last else "-"
                pad = ""
                if padded_to:
                    pad = (f" {100 * last['pad_ms'] / last['ms']:.1f} |" if last and "pad_ms" in last and "ms" in last
                           else " - |")
                label = impl
                first = next((x for x in sub if x["impl"] == impl and "backend" in x), None)
                if first is not None:  # a forced recipe: which kernel ran, and whether natively
                    label += f" ({first['backend']}" + (f"; emulated here: {', '.join(first['emulated'])}"
                                                        if first.get("emulated") else "") + ")"
                lines.append(f"| {label} | " + " | ".join(cells) + f" | {acc} |" + pad)
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows: list[dict], path: pathlib.Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib not installed: no plot")
        return
    groups = sorted({(r["d"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], groups):
        sub = [r for r in rows if r["d"] == d and r["causal"] == causal and "tops" in r]
        for impl in dict.fromkeys(r["impl"] for r in sub):
            pts = sorted((r["n"], r["tops"]) for r in sub if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            kp = sorted((r["n"], r["kernel_tops"]) for r in sub if r["impl"] == impl and "kernel_tops" in r)
            if kp:
                ax.plot([p[0] for p in kp], [p[1] for p in kp], marker="x", ls="--",
                        label=f"{impl} (kernel only)")
        ax.set_xscale("log", base=2)
        ax.set_title(f"d={d} {'causal' if causal else 'non-causal'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TOPS")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cpu_demo(head_dims: list[int] | None = None, n: int = 512) -> list[dict]:
    """No GPU: accuracy of each recipe's emulation on a small problem, on the CPU, per head dim
    (default 128). For a head dim the kernels run zero-padded, also the rel-L1 between the
    emulation of the padded call (what the kernel computes) and the emulation at d (0 up to fp32
    summation order). Returns the printed rows."""
    import sage_quant
    from sage_quant import metrics
    from sage_quant.emulation import reference_attention
    from sage_quant.inputs import make_qkv

    from ._head_dim import PaddedCall, kernel_head_dim

    print("[bench] no CUDA GPU visible: the timing benchmark is SKIPPED (it needs a GPU).")
    rows = []
    for d in head_dims or [128]:
        d_kernel = kernel_head_dim(d)
        padded = d_kernel is not None and d_kernel != d
        print(f"[bench] running the CPU emulation of every recipe instead (b=1, h=4, n={n}, d={d}, outlier inputs"
              + (f"; kernels run it zero-padded to d={d_kernel}" if padded else "") + "):")
        q, k, v = make_qkv("outlier", b=1, h_q=4, h_kv=4, s_q=n, s_kv=n, d=d, dtype=torch.bfloat16, seed=0)
        ref = reference_attention(q, k, v, is_causal=False)
        qp, kp, vp = PaddedCall(q, k, v, "bhsd", d_kernel).inputs() if padded else (None, None, None)
        print(f"{'recipe':<22} {'cos':>10} {'rel-L1':>9} {'rmse':>9} {'s':>6}"
              + (f" {'padded vs d':>12}" if padded else ""))
        for recipe in sage_quant.RECIPES:
            t0 = time.perf_counter()
            try:
                out = sage_quant.emulate(q, k, v, recipe)
            except ValueError as exc:  # e.g. an FP4 group that does not divide d
                print(f"{recipe:<22} not defined at d={d}: {exc}")
                continue
            if isinstance(out, tuple):
                out = out[0]
            m = metrics.accuracy(out, ref)
            row = {"recipe": recipe, "d": d, "n": n, **{key: float(val) for key, val in m.items()},
                   "s": time.perf_counter() - t0}
            line = (f"{recipe:<22} {m['cos']:>10.6f} {m['rel_l1']:>9.5f} {m['rmse']:>9.5f} {row['s']:>6.1f}")
            if padded:
                out_p = sage_quant.emulate(qp, kp, vp, recipe, scale=d ** -0.5)[..., :d]
                row["padded_to"] = d_kernel
                row["padded_vs_d_rel_l1"] = float(metrics.rel_l1(out_p, out))
                line += f" {row['padded_vs_d_rel_l1']:>12.2e}"
            rows.append(row)
            print(line)
    return rows


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else list(argv)
    if "--models" in args_in:  # the model-level benchmark (its own options follow)
        from . import bench_models
        args_in.remove("--models")  # the first one; bench_models has a --models option of its own
        return bench_models.main(args_in)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=None,
                   help="head dims (default 64 128; without a GPU 128); others than 64/128 run zero-padded "
                        "(sage_torch._head_dim), e.g. --d 32 80 96")
    p.add_argument("--n", type=int, nargs="+", default=None,
                   help="sequence lengths (default 1024 ... 32768; without a GPU the smallest given, else 512)")
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--recipes", nargs="*", default=[],
                   help="also time these recipes forced onto their kernels (e.g. qk_s8_pv_f16 qk_s8_pv_s8); "
                        "options after a colon: qk_s8_pv_f16:pv_accum=f16_buffer; a family prefix runs that "
                        "family's backend directly: sm80/qk_s8_pv_e4m3 (the mma.sync kernel on a Hopper)")
    p.add_argument("--out", default=os.environ.get("SAGE_BENCH_OUT", "bench-out"))
    args = p.parse_args(argv)
    for spec in args.recipes:
        parse_forced(spec)  # bad syntax fails here, before any GPU work
    FORCED_RECIPES[:] = args.recipes
    args.causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    if not torch.cuda.is_available():
        cpu_demo(args.d, n=min(args.n) if args.n else 512)
        return 0
    args.d = args.d or [64, 128]
    args.n = args.n or [1024, 2048, 4096, 8192, 16384, 32768]
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = bench_gpu(args)
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m sage_torch.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tops_definition": "4*b*h*n_q*n_k*d/time, halved for causal, d of the call (also where sage runs it "
                           "zero-padded: padded_to); 'tops' includes quantization and padding, 'pad_ms' is "
                           "the padding alone",
    }
    try:
        import sage_core

        meta["sage_core"] = sage_core.build_info()
    except Exception as exc:  # noqa: BLE001
        meta["sage_core"] = f"unavailable: {exc}"
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    table = print_table(rows)
    (out_dir / "bench.md").write_text(
        f"device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}\n"
        f"command: `{meta['command']}`\n{table}\n")
    plot(rows, out_dir / "bench.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
