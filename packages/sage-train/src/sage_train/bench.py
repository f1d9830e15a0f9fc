"""Training benchmark: sage_train (train_s8) forward+backward vs PyTorch SDPA (flash, cuDNN), one run.

    python -m sage_train.bench [--d 64 128] [--n 1024 2048 4096 8192 16384] [--causal both]
                               [--acc-n 2048] [--out DIR] [--quick]

Speed (GPU): forward + backward (``torch.autograd.grad`` of O with a random dO) of every impl on
the same bf16 inputs, CUDA events, median. TOPS = 3.5 x 4·b·h·n²·d / time (the forward's
4·b·h·n²·d plus the backward's 2.5x of it), halved for causal; 32 heads, b·n = 32k tokens below
8k (as ``sage_torch.bench``). ``sage_train`` runs whatever ``sage_train.attention`` dispatches
to: the sm90 kernel where one is registered and available, else the exact emulation, which is
timed only at n <= ``--emulation-max-n`` on b=1, h=8 (at the sizes above it would take minutes
per call); the table says which.

Gradient accuracy: cosine, rel-L1 and RMSE of dQ, dK, dV against float64 autograd of the
unquantized inputs, on ``randn`` and ``outlier`` inputs (``sage_quant.inputs``), dO ~ N(0, 1),
b=1, h=8, n=``--acc-n``, both head dims, causal and not; for sage_train, PyTorch's SDPA in bf16
(the floor a 16-bit kernel reaches) and, when sage_train ran a kernel, the emulation (the oracle:
kernel vs emulation rel-L1 is reported too).

Writes ``bench_train.json`` (device, versions, commit, command, what sage_train ran, one row per
measurement), ``bench_train.md`` and ``bench_train.png``. Without a GPU (or with ``--quick``) it
says what it skips (SDPA flash/cuDNN, the large sizes) and runs a tiny CPU problem instead: the
emulation against PyTorch's CPU SDPA, so the command and its output format are checked anywhere.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from sage_torch._env import ENV_FORCE_EMULATION, env_flag

import sage_train

from . import _dispatch

HEADS = 32
ACC_B, ACC_H = 1, 8
EMU_B, EMU_H = 1, 8  # the emulation's timing shape (issue 10's 53.7 ms figure: b=1, h=8, n=1024, d=64)
FWD_BWD_FACTOR = 3.5  # forward 1x + backward 2.5x (five n²d matmuls vs two)
QUICK = dict(n=256, b=1, h=2, acc_n=128, d=(64,))  # the CPU path


def fwd_bwd_flops(b: int, h: int, n_q: int, n_k: int, d: int, causal: bool) -> float:
    """Operations of one forward + backward: 3.5 x 4·b·h·n_q·n_k·d, halved for causal."""
    return FWD_BWD_FACTOR * 4.0 * b * h * n_q * n_k * d * (0.5 if causal else 1.0)


def batch_for(n: int) -> int:
    from sage_torch.bench import batch_for as inference_batch_for

    return inference_batch_for(n)


# ----------------------------------------------------------------------------- impls

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _sdpa(backend_name: Optional[str]) -> AttnFn:
    """PyTorch's SDPA forced onto one backend (None: PyTorch's choice, the CPU path)."""
    if backend_name is None:
        return lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "math": SDPBackend.MATH}[backend_name]

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _sage(emulate: Optional[bool] = None) -> AttnFn:
    def run(q, k, v, causal):
        return sage_train.attention(q, k, v, is_causal=causal, emulate=emulate)

    return run


def sdpa_impls(device: torch.device) -> Dict[str, AttnFn]:
    if device.type == "cuda":
        return {"sdpa_flash": _sdpa("flash"), "sdpa_cudnn": _sdpa("cudnn")}
    return {"sdpa_cpu": _sdpa(None)}


def sage_path(device: torch.device, d: int, dtype: torch.dtype = torch.bfloat16) -> Dict[str, object]:
    """What sage_train.attention runs for a (b, 32, 1024, d) call on ``device``: kernel or emulation."""
    if env_flag(ENV_FORCE_EMULATION):
        return {"kind": "emulation", "kernel": None, "reason": f"{ENV_FORCE_EMULATION}=1"}
    q = torch.empty((1, HEADS, 1024, d), device=device, dtype=dtype)
    spec, why = _dispatch.select(q, q, q, layout="bhsd", is_causal=False, scale=d ** -0.5,
                                 dp_precision="fp16", smooth_k=True)
    info = _dispatch.describe(spec)
    if spec is None:
        info["reason"] = why
    return info


def fwd_bwd(fn: AttnFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
            causal: bool) -> Tuple[torch.Tensor, ...]:
    """O = fn(q, k, v) and (dQ, dK, dV) = autograd.grad(O, (q, k, v), dO); q, k, v require grad."""
    o = fn(q, k, v, causal)
    return (o,) + torch.autograd.grad(o, (q, k, v), do)


# ----------------------------------------------------------------------------- timing


def time_ms(step: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of step() (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        from sage_torch.bench import time_cuda

        return time_cuda(step, warmup=warmup, iters=iters)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def _inputs(shape_q, shape_kv, device, dtype, seed):
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: no host copies
    q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=dtype)
                   for shape in (shape_q, shape_kv, shape_kv, shape_q))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def timing_rows(device: torch.device, ds: Sequence[int], ns: Sequence[int], causals: Sequence[bool], *,
                heads: int, batch: Callable[[int], int], emulation_max_n: int, warmup: int, iters: int,
                emulation_shape: Optional[Tuple[int, int]] = (EMU_B, EMU_H)) -> List[Dict[str, object]]:
    """One row per (impl, d, causal, n): ms and TOPS of forward + backward, or why not.

    The emulation (sage_train without a kernel) runs at n <= ``emulation_max_n`` only, with
    ``(b, h) = emulation_shape`` (None: the same b, h as the other impls)."""
    rows: List[Dict[str, object]] = []
    impls = dict(sdpa_impls(device))
    impls["sage_train"] = _sage()
    for d in ds:
        on_kernel = sage_path(device, d)["kind"] == "kernel"
        for causal in causals:
            for n in ns:
                for name, fn in impls.items():
                    b, h = batch(n), heads
                    row: Dict[str, object] = {"impl": name, "d": d, "causal": causal, "n": n}
                    if name == "sage_train":
                        row["path"] = "kernel" if on_kernel else "emulation"
                        if not on_kernel:
                            if n > emulation_max_n:
                                row["skipped"] = (f"emulation (no train_s8 kernel here) timed only at "
                                                  f"n <= {emulation_max_n}")
                                rows.append(row)
                                print(json.dumps(row), flush=True)
                                continue
                            if emulation_shape is not None:
                                b, h = emulation_shape
                    row.update(b=b, h=h)
                    try:
                        q, k, v, do = _inputs((b, h, n, d), (b, h, n, d), device, torch.bfloat16, 1000 + n + d)
                        ms = time_ms(lambda fn=fn, q=q, k=k, v=v, do=do, c=causal: fwd_bwd(fn, q, k, v, do, c),
                                     device, warmup=warmup if row.get("path") != "emulation" else 1,
                                     iters=iters if row.get("path") != "emulation" else 3)
                        row["ms"] = ms
                        row["tops"] = fwd_bwd_flops(b, h, n, n, d, causal) / ms / 1e9
                    except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    finally:
                        q = k = v = do = None
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


# ----------------------------------------------------------------------------- accuracy


def float64_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor,
                  causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """O, dQ, dK, dV of float64 attention (bhsd, same heads, bottom-right causal) by autograd."""
    from sage_quant.emulation.reference_attention import causal_allowed

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(~causal_allowed(s.shape[-2], s.shape[-1], s.device), float("-inf"))
    o = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v64
    return (o.detach(),) + torch.autograd.grad(o, (q64, k64, v64), do.double())


def accuracy_rows(device: torch.device, ds: Sequence[int], causals: Sequence[bool], *, n: int, b: int = ACC_B,
                  h: int = ACC_H, dists: Sequence[str] = ("randn", "outlier"), seed: int = 0) -> List[Dict[str, object]]:
    """Gradient accuracy vs float64: one row per (impl, dist, d, causal)."""
    from sage_quant.inputs import make_qkv
    from sage_quant.metrics import accuracy, rel_l1

    rows: List[Dict[str, object]] = []
    for d in ds:
        on_kernel = sage_path(device, d)["kind"] == "kernel"
        impls: Dict[str, AttnFn] = {"sage_train": _sage()}
        if on_kernel:
            impls["sage_train_emulation"] = _sage(emulate=True)
        impls.update(sdpa_impls(device))
        for dist in dists:
            for causal in causals:
                case_seed = seed + 7 * d + (0 if dist == "randn" else 1) + (0 if not causal else 2)
                q, k, v = make_qkv(dist, b=b, h_q=h, h_kv=h, s_q=n, s_kv=n, d=d, dtype=torch.bfloat16,
                                   seed=case_seed, device=device)
                gen = torch.Generator(device="cpu").manual_seed(case_seed + 1)
                do = torch.randn(q.shape, generator=gen).to(device=device, dtype=torch.bfloat16)
                ref = float64_grads(q, k, v, do, causal)
                outs: Dict[str, Tuple[torch.Tensor, ...]] = {}
                for name, fn in impls.items():
                    row: Dict[str, object] = {"impl": name, "dist": dist, "d": d, "causal": causal, "n": n,
                                              "b": b, "h": h}
                    if name == "sage_train":
                        row["path"] = "kernel" if on_kernel else "emulation"
                    try:
                        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                        got = tuple(t.detach() for t in fwd_bwd(fn, *xs, do, causal))
                        outs[name] = got
                        for tname, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
                            for key, val in accuracy(g, r).items():
                                row[f"{tname}_{key}"] = float(val)
                    except Exception as exc:  # noqa: BLE001
                        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    rows.append(row)
                if "sage_train_emulation" in outs and "sage_train" in outs:  # kernel vs its oracle
                    row = next(r for r in rows if r["impl"] == "sage_train" and r["dist"] == dist
                               and r["d"] == d and r["causal"] == causal)
                    for tname, a, e in zip(("o", "dq", "dk", "dv"), outs["sage_train"], outs["sage_train_emulation"]):
                        row[f"{tname}_vs_emulation_rel_l1"] = float(rel_l1(a, e))
                for row in rows[-len(impls):]:
                    print(json.dumps(row), flush=True)
                del q, k, v, do, ref, outs
    return rows


# ----------------------------------------------------------------------------- report


def format_tables(timing: List[Dict[str, object]], acc: List[Dict[str, object]]) -> str:
    lines: List[str] = []
    for d in sorted({r["d"] for r in timing}):
        for causal in (False, True):
            sub = [r for r in timing if r["d"] == d and r["causal"] == causal]
            if not sub:
                continue
            ns = sorted({r["n"] for r in sub})
            lines.append(f"\nfwd+bwd TOPS, d={d}, {'causal' if causal else 'non-causal'} "
                         f"(3.5 x 4bhn²d/t{', halved' if causal else ''})")
            lines.append("| impl | " + " | ".join(f"{n // 1024}k" if n >= 1024 else str(n) for n in ns) + " |")
            lines.append("|---" * (len(ns) + 1) + "|")
            impls = list(dict.fromkeys(r["impl"] for r in sub))
            for impl in impls:
                cells = []
                for n in ns:
                    r = next((x for x in sub if x["impl"] == impl and x["n"] == n), None)
                    if r is None:
                        cells.append("-")
                    elif "tops" in r:
                        extra = f" (b={r['b']},h={r['h']})" if r.get("path") == "emulation" else ""
                        cells.append(f"{r['tops']:.3g}{extra}" if r["tops"] < 100 else f"{r['tops']:.0f}{extra}")
                    else:
                        cells.append("skip" if "skipped" in r else "err")
                path = next((r.get("path") for r in sub if r["impl"] == impl and r.get("path")), None)
                lines.append(f"| {impl}{f' [{path}]' if path else ''} | " + " | ".join(cells) + " |")
            ratios = []
            for n in ns:
                sage = next((x for x in sub if x["impl"] == "sage_train" and x["n"] == n and "tops" in x), None)
                best = max((x["tops"] for x in sub if x["impl"].startswith("sdpa") and x["n"] == n and "tops" in x
                            and sage is not None and (x["b"], x["h"]) == (sage["b"], sage["h"])), default=None)
                ratios.append(f"{sage['tops'] / best:.2f}x" if sage and best else "-")
            lines.append("| sage_train / best SDPA (same b, h) | " + " | ".join(ratios) + " |")
    if acc:
        lines.append("\ngradient accuracy vs float64 (cos / rel-L1)")
        lines.append("| impl | dist | d | causal | n | dQ | dK | dV | vs emulation rel-L1 (O, dQ, dK, dV) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in acc:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['dist']} | {r['d']} | {r['causal']} | {r['n']} | "
                             f"error: {r['error'][:60]} | | | |")
                continue
            cells = [f"{r[f'{t}_cos']:.5f} / {r[f'{t}_rel_l1']:.4f}" for t in ("dq", "dk", "dv")]
            vs = ", ".join(f"{r[f'{t}_vs_emulation_rel_l1']:.1e}" for t in ("o", "dq", "dk", "dv")
                           if f"{t}_vs_emulation_rel_l1" in r) or "-"
            lines.append(f"| {r['impl']} | {r['dist']} | {r['d']} | {r['causal']} | {r['n']} | "
                         + " | ".join(cells) + f" | {vs} |")
    return "\n".join(lines)


def _meta(device: torch.device, argv: Sequence[str], skipped: List[str], ds: Sequence[int]) -> Dict[str, object]:
    from sage_torch.bench import commit

    meta: Dict[str, object] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m sage_train.bench " + " ".join(argv),
        "tops_definition": "3.5*4*b*h*n^2*d/time of forward+backward (autograd.grad of O), halved for causal",
        "dtype": "bfloat16",
        "sage_train_path": {str(d): sage_path(device, d) for d in ds},
        "kernel_modules": sage_train.kernel_module_status(),
        "skipped": skipped,
    }
    try:
        import sage_core

        meta["sage_core"] = sage_core.build_info()
    except Exception as exc:  # noqa: BLE001
        meta["sage_core"] = f"unavailable: {exc}"
    return meta


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    p.add_argument("--acc-n", type=int, default=2048, help="sequence length of the accuracy problem (b=1, h=8)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the gradient accuracy section")
    p.add_argument("--emulation-max-n", type=int, default=2048,
                   help="time the emulation (when no kernel runs) only up to this n, on b=1, h=8")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="the tiny CPU-sized run (forced without a GPU)")
    p.add_argument("--out", default=os.environ.get("SAGE_BENCH_OUT", "bench-out"))
    args = p.parse_args(argv)
    causals = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu and not args.quick else "cpu")
    skipped: List[str] = []
    if device.type == "cpu":
        why = "no CUDA GPU visible" if not gpu else "--quick"
        skipped = [f"SDPA flash and cuDNN backends ({why}: they need CUDA); PyTorch's CPU SDPA stands in",
                   f"the GPU sizes n={args.n}, d={args.d}, 32 heads: running n={QUICK['n']}, b={QUICK['b']}, "
                   f"h={QUICK['h']}, d={list(QUICK['d'])} instead (accuracy at n={QUICK['acc_n']})"]
        for line in skipped:
            print(f"[bench_train] SKIPPED: {line}")
        ds, ns = list(QUICK["d"]), [QUICK["n"]]
        heads, batch, acc_n = QUICK["h"], (lambda n: QUICK["b"]), QUICK["acc_n"]
        emu_max, warmup, iters, emu_shape = QUICK["n"], 1, 3, None
    else:
        ds, ns, heads, batch, acc_n = args.d, args.n, HEADS, batch_for, args.acc_n
        emu_max, warmup, iters, emu_shape = args.emulation_max_n, args.warmup, args.iters, (EMU_B, EMU_H)
    for d in ds:
        print(f"[bench_train] d={d}: sage_train runs {sage_path(device, d)}")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: one thread is faster than threads fighting for cores
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sage_train.SageTrainFallbackWarning)
            timing = timing_rows(device, ds, ns, causals, heads=heads, batch=batch, emulation_max_n=emu_max,
                                 warmup=warmup, iters=iters, emulation_shape=emu_shape)
            acc = [] if args.no_accuracy else accuracy_rows(device, ds, causals, n=acc_n,
                                                            h=ACC_H if device.type == "cuda" else QUICK["h"])
    finally:
        torch.set_num_threads(threads)
    meta = _meta(device, argv, skipped, ds)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_train.json").write_text(json.dumps({"meta": meta, "timing": timing, "accuracy": acc},
                                                         indent=1, default=str))
    table = format_tables(timing, acc)
    print(table)
    head = (f"device {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}\n"
            f"command: `{meta['command']}`\n" + "".join(f"skipped: {s}\n" for s in skipped))
    (out_dir / "bench_train.md").write_text(head + table + "\n")
    if device.type == "cuda":
        from sage_torch.bench import plot

        plot([r for r in timing if "tops" in r], out_dir / "bench_train.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
