"""Model-level benchmark: whole forwards of randomly initialised transformer stacks, sage vs SDPA.

    python -m sage_torch.bench_models [--models llama dit] [--llama-tokens ...] [--dit-tokens ...]
                                      [--iters 10] [--min-time 0.5] [--max-iters 200] [--warmup 3]
                                      [--quick] [--out bench-out/models]
    python -m sage_torch.bench --models ...        (the same; there a second --models picks models)

Two models, bf16, batch 1, random weights (nothing is downloaded):

* ``llama``: transformers' ``LlamaForCausalLM`` from a ``LlamaConfig`` (2 layers, hidden 4096,
  32 query / 8 kv heads, head dim 128, MLP 14336, vocab 32000), causal GQA prefill of n tokens,
  ``use_cache=False``. Variants go through transformers' own attention switch
  (``set_attn_implementation``): ``sdpa`` (PyTorch's SDPA, default backend choice),
  ``sdpa_cudnn`` (the same under ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)``), ``eager``
  (transformers' matmul-softmax attention: the accuracy yardstick), ``sage`` (sage's
  transformers integration, :func:`sage_torch.register_hf`) and ``no_attention`` (attention
  replaced by a copy of q: the rest of the forward, to estimate attention's share).
* ``dit``: a plain PyTorch DiT-style stack (4 pre-norm blocks, width 3072, 24 heads of 128, a
  packed qkv Linear whose output is viewed into strided q/k/v, non-causal
  ``F.scaled_dot_product_attention``, MLP 4x with GELU). Variants: ``sdpa``, ``sdpa_cudnn``,
  ``math`` (``SDPBackend.MATH``), ``float32`` (the whole model in float32, default SDPA; accuracy
  only), ``sage`` (:class:`sage_torch.patch_sdpa` around the forward) and ``no_attention``.

Per model, size and variant: median milliseconds per forward and its quartiles (CUDA events
around each forward, each synchronised, under ``torch.inference_mode``), speedup over ``sdpa``
and ``sdpa_cudnn``, and the relative L1 difference (sum|a-b| / sum|b|, float64) and
cosine of the output (llama: logits and last hidden state; dit: the final hidden state) against
the ``sdpa`` run. For the ``sage`` run it also records what sage actually ran per attention call
signature (kernel, emulation or PyTorch, with the dispatcher's reason) and how many attention
calls reached sage. The timed variants of one size run together in interleaved rounds (every
variant once per round, the order rotated by one each round and reversed in odd rounds, after
``--warmup`` rounds; the accuracy references eager, math and float32 are not timed), as many rounds as give every variant
``--min-time`` seconds of timed forwards (at least ``--iters``, at most ``--max-iters``), so that
clock ramps and host jitter fall on all of them alike; a speedup is the ratio of two medians of
the same rounds, with the quartiles of the per-round ratio next to it. Writes ``models.json``,
``models.md`` and ``models.png`` (matplotlib optional) under ``--out``. A variant that runs out of
memory is a row with ``skipped`` and the reason (the others go on); each size frees its tensors
before the next.

Without a CUDA GPU the timing is skipped (said so on stdout and in the JSON); the ``--quick``
models (tiny configs, a few dozen tokens) then run on the CPU through the same code paths, with
sage's attention as the CPU emulation of ``--cpu-recipe`` (the sm90 default recipe unless
given), so the accuracy columns and the whole pipeline can be checked on any machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import pathlib
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .bench import commit

# ----------------------------------------------------------------------------- configurations

LLAMA_FULL = {"layers": 2, "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
              "intermediate": 14336, "vocab": 32000}
LLAMA_QUICK = {"layers": 2, "hidden": 256, "heads": 4, "kv_heads": 2, "head_dim": 64,
               "intermediate": 512, "vocab": 512}
DIT_FULL = {"blocks": 4, "width": 3072, "heads": 24, "mlp_ratio": 4}
DIT_QUICK = {"blocks": 2, "width": 256, "heads": 4, "mlp_ratio": 4}
TOKENS_FULL = {"llama": [1024, 4096, 16384, 32768], "dit": [1024, 4096, 16384, 32768]}
TOKENS_QUICK = {"llama": [64, 128], "dit": [64, 128]}
MODELS = ("llama", "dit")

#: Variants per model, in run order. The first is the baseline every other one is compared to.
LLAMA_VARIANTS = ("sdpa", "sdpa_cudnn", "eager", "sage", "no_attention")
DIT_VARIANTS = ("sdpa", "sdpa_cudnn", "math", "float32", "sage", "no_attention")
#: Variants that are accuracy references only (never timed). eager/math were timed once: they
#: materialise the score matrix, and the variant after them in a round ran ~3 % slower (DiT 4k:
#: sage routed to PyTorch's own SDPA read 0.97x in bench_models, 1.00x timed alone).
UNTIMED_VARIANTS = ("float32", "eager", "math")
#: The accuracy yardstick per model: what switching the baseline to a different exact
#: attention (or precision) changes, printed next to sage's difference.
REFERENCE_VARIANTS = {"llama": ("eager",), "dit": ("math", "float32")}
#: Variants that materialise the (heads, n, n) score matrix, skipped above --dense-max-tokens.
DENSE_VARIANTS = ("eager", "math")

#: Timing defaults (--iters, --min-time, --max-iters, --warmup): the variants of one size run in
#: interleaved rounds, enough of them that every variant gets MIN_TIMED_S of timed forwards (from
#: the warm-up's fastest variant), at least MIN_ROUNDS and at most MAX_ROUNDS.
MIN_ROUNDS = 10
MIN_TIMED_S = 0.5
MAX_ROUNDS = 200
WARMUP_ROUNDS = 3

TIMING_METHOD = ("CUDA events around each forward (synchronised, inference_mode); the variants of a "
                 "size interleaved in rounds (order rotated by one each round, reversed in odd rounds; eager/math/float32 untimed) after --warmup rounds; rounds: enough for --min-time s of "
                 "timed forwards per variant, >= --iters, <= --max-iters; ms = median, ms_q1/ms_q3 = "
                 "quartiles; speedup = ratio of medians, speedup_*_q1_q3 = quartiles of the per-round ratio; "
                 "host_ms = median host time issuing a forward (above ms: host-bound)")

NO_ATTENTION_HF_NAME = "sage_bench_no_attention"
COMPARE_CHUNK_ELEMENTS = 1 << 24  # float64 elements per chunk of the output comparison


# ----------------------------------------------------------------------------- the DiT-style stack

class DiTBlock(nn.Module):
    """Pre-norm transformer block as in DiT-style image/video models (adaLN left out).

    q, k and v are strided views of one packed ``qkv`` projection, ``(b, h, n, d)`` with a
    contiguous last dim, handed straight to ``F.scaled_dot_product_attention`` (looked up at
    call time, so :class:`sage_torch.patch_sdpa` reaches it).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (b, h, n, d) views, strides (n*3c, d, 3c, 1)
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class DiTStack(nn.Module):
    def __init__(self, blocks: int, width: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio) for _ in range(blocks))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------- helpers

def compare(a: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """rel-L1 (sum|a-ref| / sum|ref|) and cosine in float64, in row chunks (logits are large).

    NaN when either tensor has a non-finite element."""
    if a.shape != ref.shape:
        raise ValueError(f"shape mismatch {tuple(a.shape)} vs {tuple(ref.shape)}")
    a2, r2 = a.reshape(-1, a.shape[-1]), ref.reshape(-1, ref.shape[-1])
    step = max(1, COMPARE_CHUNK_ELEMENTS // max(1, a2.shape[1]))
    num = den = dot = na = nr = 0.0
    finite = True
    for i in range(0, a2.shape[0], step):
        x = a2[i:i + step].to(torch.float64)
        y = r2[i:i + step].to(device=x.device, dtype=torch.float64)
        finite = finite and bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())
        num += float((x - y).abs().sum())
        den += float(y.abs().sum())
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nr += float((y * y).sum())
    if not finite:
        return {"rel_l1": math.nan, "cos": math.nan}
    rel = num / den if den > 0 else (0.0 if num == 0 else math.nan)
    cos = dot / math.sqrt(na * nr) if na > 0 and nr > 0 else math.nan
    return {"rel_l1": rel, "cos": cos}


#: Host milliseconds of the last cuda_event_ms call: from before start.record() until fn() returned
#: (what the CPU spent issuing the forward; where it exceeds the GPU time, the forward is host-bound).
_last_host_ms: list[float] = [math.nan]


def cuda_event_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one fn() between two CUDA events, synchronised on the end event (and the
    host time of issuing it in ``_last_host_ms``)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    fn()
    _last_host_ms[0] = (time.perf_counter() - t0) * 1e3
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def rounds_needed(warm_ms: dict[str, float], min_time_s: float, iters: int, max_iters: int) -> int:
    """Rounds that give every variant ``min_time_s`` of timed forwards, judged by the fastest one's
    warm-up time, capped at ``max_iters``; never fewer than ``iters``."""
    if not warm_ms or min_time_s <= 0:
        return iters
    fastest_ms = max(min(warm_ms.values()), 1e-3)
    return max(iters, min(max_iters, math.ceil(min_time_s * 1e3 / fastest_ms)))


def time_interleaved(calls: dict[str, tuple[Callable[[], object], Callable[[], Any]]], warmup: int,
                     iters: int, min_time_s: float, max_iters: int,
                     clock: Callable[[Callable[[], object]], float] | None = None,
                     ) -> tuple[dict[str, list[float]], dict[str, BaseException], int]:
    """Times the variants of one size in interleaved rounds, rotated: A B C, B C A, C A B, ...

    ``calls`` maps a variant to ``(forward, context)``; each forward runs inside a fresh
    ``context()`` (entered outside the timed span) and is timed by ``clock`` (default:
    :func:`cuda_event_ms`). ``warmup`` untimed rounds come first; the fastest warm-up time per
    variant sets the number of timed rounds (:func:`rounds_needed`; ``iters`` without warm-up).
    Interleaving spreads clock ramps and host jitter over every variant instead of the one that
    runs first, and a speedup compares times of the same rounds. A variant that raises is dropped
    from the remaining rounds (the others go on) and returned with its exception.

    Returns ``(ms per timed round per variant, failures, rounds)``; every surviving variant has
    one time per round."""
    own_clock = clock is None
    clock = clock or cuda_event_ms
    failed: dict[str, BaseException] = {}
    host_ms: dict[str, list[float]] = {name: [] for name in calls}

    def one(name: str) -> float | None:
        fwd, context = calls[name]
        try:
            with context():
                t = clock(fwd)
            if own_clock:
                host_ms[name].append(_last_host_ms[0])
            return t
        except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
            failed[name] = exc
            free_memory()
            return None

    warm_ms: dict[str, float] = {}
    for _ in range(warmup):
        for name in calls:
            if name not in failed and (t := one(name)) is not None:
                warm_ms[name] = min(warm_ms.get(name, math.inf), t)
    live = [name for name in calls if name not in failed]
    rounds = iters
    if warmup:
        rounds = rounds_needed({k: warm_ms[k] for k in live if k in warm_ms}, min_time_s, iters, max_iters)
    times: dict[str, list[float]] = {name: [] for name in live}
    for h in host_ms.values():
        h.clear()  # the timed rounds' host times only
    for r in range(rounds):
        # Round r starts at variant r (mod n), and odd rounds run backwards: every position is taken
        # alike, and a variant follows a different one in alternate rounds (a plain rotation keeps
        # each variant's predecessor, whose clocks and caches it inherits, the same in every round).
        order = live[r % len(live):] + live[:r % len(live)]
        for name in (order[::-1] if r % 2 else order):
            if name not in failed and (t := one(name)) is not None:
                times[name].append(t)
    last_host_ms.clear()
    last_host_ms.update({k: v for k, v in host_ms.items() if v and k not in failed})
    return {k: v for k, v in times.items() if k not in failed}, failed, rounds


#: Host ms per timed round per variant of the last time_interleaved call with the CUDA-event clock.
last_host_ms: dict[str, list[float]] = {}


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile), inclusive method (a single value: three times)."""
    if len(values) < 2:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def timing_stats(times: list[float], warmup: int) -> dict[str, Any]:
    """A row's timing fields: median ``ms``, quartiles ``ms_q1``/``ms_q3``, ``ms_iqr_rel``
    ((q3 - q1) / median), ``ms_min``/``ms_max``, ``iters`` (timed rounds), ``warmup``, ``timed_s``."""
    q1, med, q3 = quartiles(times)
    return {"ms": med, "ms_q1": q1, "ms_q3": q3, "ms_iqr_rel": (q3 - q1) / med if med > 0 else math.nan,
            "ms_min": min(times), "ms_max": max(times), "iters": len(times), "warmup": warmup,
            "timed_s": sum(times) / 1e3}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    oom_types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                  getattr(torch.cuda, "OutOfMemoryError", None)) if t is not None)
    return isinstance(exc, oom_types) or "out of memory" in str(exc).lower()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def sdpa_backend_context(name: str | None):
    """A context forcing one SDPA backend (``"cudnn"``, ``"math"``) or a no-op for None."""
    if name is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name])


@contextlib.contextmanager
def cpu_sage_emulation(recipe: str) -> Iterator[None]:
    """On the CPU only: let sage's SDPA drop-in take CPU tensors and run ``recipe``'s emulation.

    sage's kernels need CUDA, so on CPU tensors its drop-in goes to PyTorch's SDPA; this widens
    ``api.SDPA_DEVICE_TYPES`` to the CPU and forces the recipe's emulation through the documented
    environment switches (``SAGE_FORCE_RECIPE``, ``SAGE_FORCE_EMULATION``) for the block."""
    from . import api

    saved_types = api.SDPA_DEVICE_TYPES
    saved_env = {k: os.environ.get(k) for k in ("SAGE_FORCE_RECIPE", "SAGE_FORCE_EMULATION")}
    api.SDPA_DEVICE_TYPES = tuple(dict.fromkeys((*saved_types, "cpu")))
    os.environ["SAGE_FORCE_RECIPE"] = recipe
    os.environ["SAGE_FORCE_EMULATION"] = "1"
    try:
        yield
    finally:
        api.SDPA_DEVICE_TYPES = saved_types
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def record_sage_calls() -> Iterator[dict[str, Any]]:
    """Count the attention calls that reach :func:`sage_torch.attention` (the drop-in's hand-off
    to sage) and ask the dispatcher, once per call signature, what it runs there. Also collects
    sage's fallback warnings (re-armed for the block). For the probe forward only, never timed."""
    from . import _dispatch, api

    log: dict[str, Any] = {"attention_calls": 0, "signatures": {}, "warnings": []}
    inner = api.attention

    def spy(q, k, v, **kwargs):
        log["attention_calls"] += 1
        key = (f"q{tuple(q.shape)} k{tuple(k.shape)} {str(q.dtype).replace('torch.', '')} "
               f"causal={kwargs.get('is_causal', False)}")
        entry = log["signatures"].setdefault(key, {"calls": 0})
        entry["calls"] += 1
        if "decision" not in entry:
            try:
                call = {"q": q, "k": k, "v": v,
                        "kwargs": {"layout": kwargs.get("layout", "bhsd"),
                                   "is_causal": bool(kwargs.get("is_causal", False)),
                                   "scale": kwargs.get("scale") or q.shape[-1] ** -0.5, "return_lse": False}}
                entry["decision"] = _dispatch.resolve(_dispatch.device_arch(q.device), q.dtype, q.shape[-1],
                                                      kwargs.get("recipe", "auto"), strict=False,
                                                      call=call).describe()
            except Exception as exc:  # noqa: BLE001 - a report, never a failure
                entry["decision"] = {"error": _error_text(exc)}
        return inner(q, k, v, **kwargs)

    api.attention = spy
    _dispatch.reset_warnings()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield log
    finally:
        api.attention = inner
    from ._dispatch import SageFallbackWarning

    log["warnings"] = list(dict.fromkeys(str(w.message) for w in caught
                                         if issubclass(w.category, SageFallbackWarning)))


def summarize_sage(log: dict[str, Any], expected_calls: int) -> str:
    """'kernel qk_s8_pv_e4m3 x2' / 'torch x2 (reason)' / 'PyTorch SDPA (drop-in fallback) x2'."""
    parts = []
    for entry in log["signatures"].values():
        d = entry.get("decision", {})
        what = d.get("kind", "?")
        if d.get("recipe"):
            what += f" {d['recipe']}"
        if d.get("kind") == "torch" and d.get("reason"):
            what += f" ({d['reason'][:80]})"
        parts.append(f"{what} x{entry['calls']}")
    missing = expected_calls - log["attention_calls"]
    if missing > 0:
        parts.append(f"PyTorch SDPA (drop-in fallback) x{missing}")
    return "; ".join(parts) or "none"


# ----------------------------------------------------------------------------- the runs

def _failure(exc: BaseException, when: str = "") -> dict[str, str]:
    """A failed variant's row fields: ``skipped`` for out of memory, ``error`` otherwise."""
    if _is_oom(exc):
        return {"skipped": f"out of memory{when}: {_error_text(exc)[:200]}"}
    return {"error": f"{when.strip() + ': ' if when else ''}{_error_text(exc)}"}


class Runner:
    """Runs the variants of one model at one size: a probe forward of each (accuracy), one after
    the other, then the timed variants together in interleaved rounds (:func:`time_interleaved`)."""

    def __init__(self, args, device: torch.device, timed: bool) -> None:
        self.args, self.device, self.timed = args, device, timed
        self.rows: list[dict[str, Any]] = []

    def run_size(self, model_name: str, n: int, variants: dict[str, Callable[[], Any]],
                 outputs_of: Callable[[Any], dict[str, torch.Tensor]], expected_calls: int,
                 skip: dict[str, str]) -> None:
        baseline: dict[str, torch.Tensor] | None = None
        base_name = next(iter(variants))
        rows: dict[str, dict[str, Any]] = {}
        to_time: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {}
        for name, make in variants.items():
            row: dict[str, Any] = {"model": model_name, "tokens": n, "variant": name}
            rows[name] = row
            if name in skip:
                row["skipped"] = skip[name]
                continue
            fwd = None
            try:
                fwd, context = make()
                with torch.inference_mode():
                    if name == "sage":
                        with record_sage_calls() as log, context():
                            out = fwd()
                        row["sage_attention_calls"] = log["attention_calls"]
                        row["attention_calls_expected"] = expected_calls
                        row["sage_signatures"] = log["signatures"]
                        row["sage_warnings"] = log["warnings"]
                        row["sage_ran"] = summarize_sage(log, expected_calls)
                    else:
                        with context():
                            out = fwd()
                    outs = outputs_of(out)
                    del out
                    if name == base_name:
                        baseline = outs
                    elif name != "no_attention" and baseline is not None:
                        row["vs_" + base_name] = {k: compare(v, baseline[k]) for k, v in outs.items()}
                    del outs
                if self.timed and name not in UNTIMED_VARIANTS:
                    to_time[name] = (fwd, context)
                elif not self.timed:
                    row["timing"] = "skipped: CPU run"
            except Exception as exc:  # noqa: BLE001 - a failing variant is a row, not a crash
                row.update(_failure(exc))
            finally:
                fwd = None
                free_memory()
        baseline = None
        if to_time:
            self._time(model_name, n, rows, to_time)
        to_time.clear()
        free_memory()
        for row in rows.values():
            print(json.dumps(row, default=str), flush=True)
        self.rows.extend(rows.values())

    def _time(self, model_name: str, n: int, rows: dict[str, dict[str, Any]],
              calls: dict[str, tuple[Callable[[], Any], Callable[[], Any]]]) -> None:
        """Times ``calls`` in interleaved rounds; fills ``ms``..., the speedups and the attention share."""
        a = self.args
        print(f"[bench_models] {model_name} {n}: timing {', '.join(calls)} in interleaved rounds "
              f"({a.warmup} warm-up)", flush=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            times, failed, rounds = time_interleaved(calls, a.warmup, a.iters, a.min_time, a.max_iters)
        print(f"[bench_models] {model_name} {n}: {rounds} rounds, {time.perf_counter() - t0:.1f} s", flush=True)
        for name, exc in failed.items():
            rows[name].update(_failure(exc, " while timing"))
        for name, ts in times.items():
            rows[name].update(timing_stats(ts, a.warmup))
            if last_host_ms.get(name):
                rows[name]["host_ms"] = quartiles(last_host_ms[name])[1]  # median host time per forward
        # Speedups: ratio of the medians, and the quartiles of the per-round ratio (same rounds).
        for name, ts in times.items():
            for base in ("sdpa", "sdpa_cudnn"):
                if base in times:
                    rows[name][f"speedup_vs_{base}"] = rows[base]["ms"] / rows[name]["ms"]
                    q1, _, q3 = quartiles([b / t for b, t in zip(times[base], ts)])
                    rows[name][f"speedup_vs_{base}_q1_q3"] = [q1, q3]
            if "no_attention" in times and name != "no_attention":
                r = rows[name]
                r["attention_fraction_est"] = max(0.0, (r["ms"] - rows["no_attention"]["ms"]) / r["ms"])


def _dense_skip(variants, n: int, args) -> dict[str, str]:
    return {v: (f"{v} materialises the (heads, n, n) score matrix: skipped above "
                f"--dense-max-tokens={args.dense_max_tokens}")
            for v in variants if v in DENSE_VARIANTS and n > args.dense_max_tokens}


def _cuda_only_skip(variants, device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        return {}
    return {v: "the cuDNN SDPA backend needs a CUDA GPU" for v in variants if v == "sdpa_cudnn"}


def hf_versions() -> dict[str, str]:
    """Installed versions of the third-party distributions this benchmark touches (not imported)."""
    from importlib import metadata

    out = {}
    for dist in ("transformers", "huggingface-hub", "tokenizers", "safetensors", "numpy", "matplotlib"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _hf_no_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function that does no attention (output: a copy of q)."""
    return query.transpose(1, 2).contiguous(), None


def _register_hf_no_attention() -> str:
    from transformers import AttentionInterface

    AttentionInterface.register(NO_ATTENTION_HF_NAME, _hf_no_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        ALL_MASK_ATTENTION_FUNCTIONS.register(NO_ATTENTION_HF_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    except (ImportError, KeyError, AttributeError):
        pass
    return NO_ATTENTION_HF_NAME


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers: the implementation is read from the config per forward
        model.config._attn_implementation = name


def bench_llama(runner: Runner, cfg: dict[str, int], tokens: list[int]) -> None:
    args, device = runner.args, runner.device
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except Exception as exc:  # noqa: BLE001
        reason = f"transformers is not importable: {_error_text(exc)}"
        print(f"[bench_models] llama SKIPPED: {reason}")
        runner.rows.append({"model": "llama", "skipped": reason})
        return
    try:
        import sage_torch

        sage_name = sage_torch.register_hf()
    except Exception as exc:  # noqa: BLE001 - report it, do not work around it
        sage_name = None
        sage_skip = f"sage's transformers integration failed: {_error_text(exc)}"
        print(f"[bench_models] {sage_skip}")
    null_name = _register_hf_no_attention()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                         num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
                         max_position_embeddings=max(tokens), use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    impl = {"sdpa": ("sdpa", None), "sdpa_cudnn": ("sdpa", "cudnn"), "eager": ("eager", None),
            "sage": (sage_name, None), "no_attention": (null_name, None)}
    for n in tokens:
        gen = torch.Generator(device=device).manual_seed(1000 + n)
        ids = torch.randint(0, cfg["vocab"], (1, n), device=device, generator=gen)
        skip = {**_dense_skip(LLAMA_VARIANTS, n, args), **_cuda_only_skip(LLAMA_VARIANTS, device)}
        if sage_name is None:
            skip["sage"] = sage_skip

        variants = {name: _llama_variant(model, ids, *impl[name]) for name in LLAMA_VARIANTS}
        runner.run_size("llama", n, variants, lambda out: out, cfg["layers"], skip)
        variants = ids = None
        free_memory()
    _set_attn(model, "sdpa")
    model = None
    free_memory()


def _llama_variant(model, ids: torch.Tensor, attn: str | None, backend: str | None):
    """Builder of one llama variant: returns (forward, context).

    The variants share one model, so the context selects this variant's attention implementation
    (and SDPA backend) on entry, before every call: the timed rounds interleave the variants.
    The first (probe) call returns what is compared (last hidden state and logits = lm_head of
    it, exactly what ``LlamaForCausalLM.forward`` computes); the timed calls run the full model."""
    @contextlib.contextmanager
    def context() -> Iterator[None]:
        _set_attn(model, attn)
        with sdpa_backend_context(backend):
            yield

    def build():
        state = {"probe": True}

        def fwd():
            if state["probe"]:
                state["probe"] = False
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                return {"hidden": hidden, "logits": model.lm_head(hidden)}
            return model(input_ids=ids, use_cache=False)
        return fwd, context
    return build


def bench_dit(runner: Runner, cfg: dict[str, int], tokens: list[int]) -> None:
    args, device = runner.args, runner.device
    try:
        from sage_torch import patch_sdpa
    except Exception as exc:  # noqa: BLE001 - report it, do not work around it
        patch_sdpa = None
        sage_skip = f"sage_torch.patch_sdpa failed to import: {_error_text(exc)}"
        print(f"[bench_models] {sage_skip}")
    torch.manual_seed(0)
    with torch.device(device):
        model = DiTStack(cfg["blocks"], cfg["width"], cfg["heads"], cfg["mlp_ratio"])
    model = model.to(torch.bfloat16).eval()

    for n in tokens:
        gen = torch.Generator(device=device).manual_seed(2000 + n)
        x = torch.randn(1, n, cfg["width"], device=device, generator=gen).to(torch.bfloat16)
        skip = {**_dense_skip(DIT_VARIANTS, n, args), **_cuda_only_skip(DIT_VARIANTS, device)}
        if patch_sdpa is None:
            skip["sage"] = sage_skip
        variants = {
            "sdpa": _dit_variant(model, x, contextlib.nullcontext),
            "sdpa_cudnn": _dit_variant(model, x, lambda: sdpa_backend_context("cudnn")),
            "math": _dit_variant(model, x, lambda: sdpa_backend_context("math")),
            "float32": _dit_float32_variant(model, x),
            "sage": _dit_variant(model, x, patch_sdpa if patch_sdpa is not None else contextlib.nullcontext),
            "no_attention": _dit_variant(model, x, _no_attention_sdpa),
        }
        runner.run_size("dit", n, variants, lambda out: {"hidden": out}, cfg["blocks"], skip)
        variants = x = None
        free_memory()
    model = None
    free_memory()


@contextlib.contextmanager
def _no_attention_sdpa() -> Iterator[None]:
    """F.scaled_dot_product_attention returns q itself (no attention) for the block."""
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: q
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


def _dit_variant(model: nn.Module, x: torch.Tensor, context: Callable[[], Any]):
    return lambda: ((lambda: model(x)), context)


def _dit_float32_variant(model: nn.Module, x: torch.Tensor):
    """The whole model and input in float32, default SDPA: one forward (accuracy only), then freed."""
    def build():
        holder = {"model": copy.deepcopy(model).float(), "x": x.float()}

        def fwd():
            try:
                return holder["model"](holder["x"])
            finally:
                holder.clear()
        return fwd, contextlib.nullcontext
    return build


# ----------------------------------------------------------------------------- report

def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def _row(rows, model, n, variant) -> dict[str, Any]:
    return next((r for r in rows if r.get("model") == model and r.get("tokens") == n
                 and r.get("variant") == variant), {})


def _cell_ms(r: dict[str, Any]) -> str:
    if "ms" in r:
        return f"{r['ms']:.2f}"
    if "skipped" in r:
        return "skip"
    if "error" in r:
        return "err"
    return "-"


def _cell_speedup(r: dict[str, Any], base: str) -> str:
    """'1.05x [1.03-1.06]': ratio of medians [quartiles of the per-round ratio]."""
    if f"speedup_vs_{base}" not in r:
        return "-"
    cell = f"{r[f'speedup_vs_{base}']:.2f}x"
    q = r.get(f"speedup_vs_{base}_q1_q3")
    return cell + (f" [{q[0]:.2f}–{q[1]:.2f}]" if q else "")


def _cell_spread(r: dict[str, Any]) -> str:
    return _fmt(r.get("ms_iqr_rel"), ".0%")


def _rel(r: dict[str, Any], key: str) -> str:
    vs = r.get("vs_sdpa", {})
    if vs:
        return _fmt(vs.get(key, {}).get("rel_l1"), ".2e")
    return "skip" if "skipped" in r else "err" if "error" in r else "-"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for model in MODELS:
        sub = [r for r in rows if r.get("model") == model and "tokens" in r]
        lines += [f"\n### {model}: SKIPPED ({r['skipped']})" for r in rows
                  if r.get("model") == model and "tokens" not in r and "skipped" in r]
        if not sub:
            continue
        keys = ("logits", "hidden") if model == "llama" else ("hidden",)
        refs = REFERENCE_VARIANTS[model]
        lines.append(f"\n### {model} (ms per forward, median of interleaved rounds; speedup = ratio of "
                     f"medians [quartiles of the per-round ratio]; rel-L1 of {' / '.join(keys)} vs the "
                     f"sdpa run)\n")
        head = ["tokens", "sdpa ms", "cuDNN ms", "sage ms", "sage vs sdpa", "sage vs cuDNN",
                "rel-L1 sage"] + [f"rel-L1 {ref}" for ref in refs] + [
                "attn share (sdpa)", "IQR/median sdpa / cuDNN / sage", "host ms sdpa / sage", "rounds", "sage ran"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|---" * len(head) + "|")
        for n in sorted({r["tokens"] for r in sub}):
            sdpa, cudnn, sage = (_row(sub, model, n, v) for v in ("sdpa", "sdpa_cudnn", "sage"))
            sage_rel = " / ".join(_rel(sage, k) for k in keys)
            ref_rel = [" / ".join(_rel(_row(sub, model, n, ref), k) for k in keys) for ref in refs]
            cells = [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n), _cell_ms(sdpa), _cell_ms(cudnn),
                     _cell_ms(sage), _cell_speedup(sage, "sdpa"), _cell_speedup(sage, "sdpa_cudnn"),
                     sage_rel, *ref_rel, _fmt(sdpa.get("attention_fraction_est"), ".0%"),
                     " / ".join(_cell_spread(r) for r in (sdpa, cudnn, sage)),
                     " / ".join(_fmt(r.get("host_ms"), ".2f") for r in (sdpa, sage)),
                     str(next((r["iters"] for r in (sdpa, cudnn, sage) if "iters" in r), "-")),
                     sage.get("sage_ran", sage.get("skipped", sage.get("error", "-")))[:120]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench_models] matplotlib not installed: no plot")
        return False
    models = [m for m in MODELS if any(r.get("model") == m and "ms" in r for r in rows)]
    if not models:
        return False
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r.get("model") == model and "speedup_vs_sdpa" in r]
        for variant in dict.fromkeys(r["variant"] for r in sub):
            if variant in ("sdpa", "no_attention"):
                continue
            pts = sorted((r["tokens"], r["speedup_vs_sdpa"], r.get("speedup_vs_sdpa_q1_q3") or [math.nan] * 2)
                         for r in sub if r["variant"] == variant)
            x, y = [p[0] for p in pts], [p[1] for p in pts]
            # error bars: the quartiles of the per-round ratio (none where a row has no rounds)
            yerr = [[max(0.0, p[1] - p[2][0]) if p[2][0] == p[2][0] else 0.0 for p in pts],
                    [max(0.0, p[2][1] - p[1]) if p[2][1] == p[2][1] else 0.0 for p in pts]]
            ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label=variant)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}: forward speedup over default SDPA")
        ax.set_xlabel("tokens")
        ax.set_ylabel("sdpa ms / variant ms")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True




def _meta(args, device: torch.device, timed: bool, command: str, configs: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "commit": commit(),
        "command": command,
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "timing": (TIMING_METHOD if timed
                   else "skipped: no GPU used (the --quick models ran on the CPU for accuracy only)"),
        "quick": bool(args.quick),
        "warmup": args.warmup,
        "iters": args.iters,
        "min_time_s": args.min_time,
        "max_iters": args.max_iters,
        "dtype": "bfloat16",
        "batch": 1,
        "configs": configs,
        "python": sys.version.split()[0],
        "libraries": hf_versions(),
    }
    if device.type == "cpu":
        meta["sage_cpu_recipe"] = args.cpu_recipe
    try:
        import sage_torch

        meta["sage_info"] = json.loads(json.dumps(sage_torch.info(device), default=str))
    except Exception as exc:  # noqa: BLE001
        meta["sage_info"] = f"unavailable: {_error_text(exc)}"
    return meta


def main(argv: list[str] | None = None, prog: str = "python -m sage_torch.bench_models") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", "--only", dest="models", nargs="+", choices=MODELS, default=list(MODELS),
                   help="models to run (python -m sage_torch.bench --models takes the first --models as "
                        "its switch, so there: --models --models dit)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="sizes for every model")
    p.add_argument("--llama-tokens", type=int, nargs="+", default=None, help="sizes for llama (over --tokens)")
    p.add_argument("--dit-tokens", type=int, nargs="+", default=None, help="sizes for dit (over --tokens)")
    p.add_argument("--iters", type=int, default=MIN_ROUNDS,
                   help="timed rounds at least (a round runs every timed variant of a size once)")
    p.add_argument("--min-time", type=float, default=MIN_TIMED_S,
                   help="seconds of timed forwards every variant gets at least, judged by the fastest "
                        "variant's warm-up time: more rounds where a forward is short (0: --iters rounds)")
    p.add_argument("--max-iters", type=int, default=MAX_ROUNDS,
                   help="cap on the rounds --min-time asks for (never below --iters)")
    p.add_argument("--warmup", type=int, default=WARMUP_ROUNDS,
                   help="untimed rounds of every variant before the timed ones")
    p.add_argument("--dense-max-tokens", type=int, default=16384,
                   help="skip eager/math (dense score matrix) above this many tokens")
    p.add_argument("--quick", action="store_true", help="tiny configs and sizes (pipeline check; CPU test)")
    p.add_argument("--cpu-recipe", default=None,
                   help="recipe whose emulation sage runs on the CPU (default: the sm90 default recipe)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPU when there is one; cpu: the CPU path (no timing, sage emulated)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--out", default=os.environ.get("SAGE_BENCH_MODELS_OUT", "bench-out/models"))
    args = p.parse_args(argv)
    command = prog + "".join(" " + a for a in (sys.argv[1:] if argv is None else argv))
    for flag, low in (("iters", 1), ("max_iters", 1), ("warmup", 0), ("min_time", 0)):
        if getattr(args, flag) < low:
            p.error(f"--{flag.replace('_', '-')} must be >= {low}, got {getattr(args, flag)}")

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    timed = torch.cuda.is_available() and args.device != "cpu"
    device = torch.device("cuda") if timed else torch.device("cpu")
    if not timed:
        print("[bench_models] " + ("--device cpu" if args.device == "cpu" else "no CUDA GPU visible")
              + ": the timing benchmark is SKIPPED (it needs a GPU).")
        if not args.quick:
            print("[bench_models] running the --quick models on the CPU instead (tiny configs, sage's "
                  "CPU emulation): accuracy and the code paths only.")
            args.quick = True
    if args.cpu_recipe is None:
        from ._dispatch import ARCH_DEFAULT_RECIPES

        args.cpu_recipe = ARCH_DEFAULT_RECIPES["sm90"][0]
    llama_cfg, dit_cfg = (LLAMA_QUICK, DIT_QUICK) if args.quick else (LLAMA_FULL, DIT_FULL)
    base_tokens = TOKENS_QUICK if args.quick else TOKENS_FULL
    tokens = {"llama": args.llama_tokens or args.tokens or base_tokens["llama"],
              "dit": args.dit_tokens or args.tokens or base_tokens["dit"]}
    configs = {m: {"config": (llama_cfg if m == "llama" else dit_cfg), "tokens": tokens[m]} for m in args.models}

    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, device, timed)
    emulation = contextlib.nullcontext() if timed else cpu_sage_emulation(args.cpu_recipe)
    with emulation:
        if "llama" in args.models:
            bench_llama(runner, llama_cfg, tokens["llama"])
        if "dit" in args.models:
            bench_dit(runner, dit_cfg, tokens["dit"])
    meta = _meta(args, device, timed, command, configs)
    result = {"meta": meta, "rows": runner.rows}
    (out_dir / "models.json").write_text(json.dumps(result, indent=1, default=str))
    table = markdown_table(runner.rows)
    header = (f"device {meta['device']}, torch {meta['torch']}, transformers "
              f"{meta['libraries'].get('transformers')}, commit {meta['commit']}, {meta['timestamp']}\n"
              f"command: `{meta['command']}`\ntiming: {meta['timing']}\n")
    (out_dir / "models.md").write_text(header + table + "\n")
    print(header + table)
    if not args.no_plot and plot(runner.rows, out_dir / "models.png"):
        print(f"[bench_models] plot: {out_dir / 'models.png'}")
    print(f"[bench_models] wrote {out_dir / 'models.json'} and {out_dir / 'models.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
