"""Model-level benchmark: ``python -m sage_torch.bench --models`` (or ``python -m sage_torch.bench_models``).

Randomly initialised transformer stacks in bf16, batch 1, timed per forward (CUDA events, median)
through the integration points users call:

* **Llama-style causal GQA prefill**: transformers' ``LlamaModel`` from a ``LlamaConfig`` (2 layers,
  width 4096, 32 query / 8 kv heads, head dim 128, MLP 14336), run with
  ``attn_implementation="sdpa"`` (PyTorch's default SDPA backend), the same under
  ``sdpa_kernel(CUDNN_ATTENTION)``, ``"eager"`` (accuracy reference, short inputs only) and
  ``"sage"`` (``sage_torch.integrations.register_hf``).
* **DiT-style non-causal stack**: 4 pre-norm blocks, width 3072, 24 heads (d=128), a packed qkv
  projection whose strided q/k/v views go to ``F.scaled_dot_product_attention``; run with the
  default SDPA, SDPA forced to cuDNN, the math backend (accuracy reference, short inputs only) and
  ``sage_torch.patch_sdpa()``.

Per model and size: ms per forward, speedup of sage over default SDPA and over cuDNN, and the
output's rel-L1 to the default-SDPA run next to the reference implementation's. JSON + markdown
table (+ PNG when matplotlib imports) under ``--out`` (default ``bench-out/models``).
``--quick`` runs tiny configurations (the CPU test uses it; without a GPU nothing is timed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LLAMA = dict(layers=2, width=4096, heads=32, kv_heads=8, mlp=14336, vocab=32000)
LLAMA_QUICK = dict(layers=1, width=128, heads=4, kv_heads=2, mlp=256, vocab=128)
DIT = dict(blocks=4, width=3072, heads=24)
DIT_QUICK = dict(blocks=1, width=128, heads=2)
LLAMA_TOKENS = [1024, 4096, 16384, 32768]
DIT_TOKENS = [1024, 4096, 16384, 32768]
REF_MAX_TOKENS = 4096  # eager / math references materialise s x s scores: short inputs only


def _commit() -> str:
    if os.environ.get("SAGE_COMMIT"):
        return os.environ["SAGE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-30))


def time_ms(fn: Callable[[], torch.Tensor], iters: int, warmup: int = 2) -> float:
    if not torch.cuda.is_available():
        fn()
        return float("nan")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _cudnn():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.CUDNN_ATTENTION)


def _math():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


# ----------------------------------------------------------------------------- models
class DiTBlock(nn.Module):
    """Pre-norm attention + MLP with a packed qkv projection (q/k/v are strided views, as in DiTs)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (b, h, n, d) strided views
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, w))
        return x + self.mlp(self.norm2(x))


def make_dit(cfg: dict, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[DiTBlock(cfg["width"], cfg["heads"]) for _ in range(cfg["blocks"])]).to(device, dtype).eval()


def make_llama(cfg: dict, max_tokens: int, device, dtype):
    from transformers import LlamaConfig, LlamaModel
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=cfg["width"], num_attention_heads=cfg["heads"],
                         num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["mlp"],
                         num_hidden_layers=cfg["layers"], vocab_size=cfg["vocab"],
                         max_position_embeddings=max(max_tokens, 2048), attn_implementation="sdpa")
    return LlamaModel(config).to(device, dtype).eval()


def _set_attn(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


# ----------------------------------------------------------------------------- runs
def _row(model: str, tokens: int, outs: dict, times: dict, ref_name: str) -> dict:
    base = outs["sdpa"]
    row = {"model": model, "tokens": tokens, **{f"ms_{k}": v for k, v in times.items()}}
    row["speedup_vs_sdpa"] = times["sdpa"] / times["sage"]
    row["speedup_vs_cudnn"] = times["sdpa_cudnn"] / times["sage"] if "sdpa_cudnn" in times else float("nan")
    row["rel_l1_sage_vs_sdpa"] = rel_l1(outs["sage"], base)
    row[f"rel_l1_{ref_name}_vs_sdpa"] = rel_l1(outs[ref_name], base) if ref_name in outs else None
    return row


def bench_llama(cfg: dict, tokens_list: list[int], iters: int, device, dtype, *, spy=None) -> list[dict]:
    from .integrations import register_hf
    name = register_hf()
    model = make_llama(cfg, max(tokens_list), device, dtype)
    rows = []
    for n in tokens_list:
        g = torch.Generator(device="cpu").manual_seed(n)
        ids = torch.randint(0, cfg["vocab"], (1, n), generator=g).to(device)
        outs, times = {}, {}

        def fwd():
            return model(input_ids=ids).last_hidden_state

        variants = [("sdpa", "sdpa", contextlib.nullcontext), ("sdpa_cudnn", "sdpa", _cudnn), ("sage", name, contextlib.nullcontext)]
        if n <= REF_MAX_TOKENS:
            variants.append(("eager", "eager", contextlib.nullcontext))
        for label, impl, ctx in variants:
            if label == "sdpa_cudnn" and device.type != "cuda":
                continue
            _set_attn(model, impl)
            try:
                with torch.inference_mode(), ctx():
                    outs[label] = fwd().float().cpu()
                    times[label] = time_ms(fwd, iters) if label != "eager" else float("nan")
            except torch.OutOfMemoryError as exc:
                times[label] = float("nan")
                print(f"[bench_models] llama {n}: {label} skipped (out of memory: {exc})")
            torch.cuda.empty_cache() if device.type == "cuda" else None
        _set_attn(model, "sdpa")
        if "sdpa" in outs and "sage" in outs:
            rows.append(_row("llama", n, outs, times, "eager"))
    del model
    return rows


def bench_dit(cfg: dict, tokens_list: list[int], iters: int, device, dtype) -> list[dict]:
    from .integrations import patch_sdpa
    model = make_dit(cfg, device, dtype)
    rows = []
    for n in tokens_list:
        g = torch.Generator(device="cpu").manual_seed(n)
        x = torch.randn(1, n, cfg["width"], generator=g).to(device, dtype)
        outs, times = {}, {}

        def fwd():
            return model(x)

        variants = [("sdpa", contextlib.nullcontext), ("sdpa_cudnn", _cudnn), ("sage", patch_sdpa)]
        if n <= REF_MAX_TOKENS:
            variants.append(("math", _math))
        for label, ctx in variants:
            if label == "sdpa_cudnn" and device.type != "cuda":
                continue
            try:
                with torch.inference_mode(), ctx():
                    outs[label] = fwd().float().cpu()
                    times[label] = time_ms(fwd, iters) if label != "math" else float("nan")
            except torch.OutOfMemoryError as exc:
                times[label] = float("nan")
                print(f"[bench_models] dit {n}: {label} skipped (out of memory: {exc})")
        if "sdpa" in outs and "sage" in outs:
            rows.append(_row("dit", n, outs, times, "math"))
    del model
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | tokens | SDPA default ms | SDPA cuDNN ms | sage ms | sage / default | sage / cuDNN "
             "| rel-L1 sage vs SDPA | rel-L1 reference vs SDPA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref = r.get("rel_l1_eager_vs_sdpa", r.get("rel_l1_math_vs_sdpa"))
        ref_txt = "—" if ref is None else f"{ref:.4f} ({'eager' if r['model'] == 'llama' else 'math'})"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['ms_sdpa']:.2f} | {r.get('ms_sdpa_cudnn', float('nan')):.2f} "
                     f"| {r['ms_sage']:.2f} | {r['speedup_vs_sdpa']:.3f}x | {r['speedup_vs_cudnn']:.3f}x "
                     f"| {r['rel_l1_sage_vs_sdpa']:.4f} | {ref_txt} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench_models] matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in rows}):
        rs = [r for r in rows if r["model"] == model]
        ax.plot([r["tokens"] for r in rs], [r["speedup_vs_sdpa"] for r in rs], marker="o", label=f"{model}: vs default SDPA")
        ax.plot([r["tokens"] for r in rs], [r["speedup_vs_cudnn"] for r in rs], marker="x", ls="--", label=f"{model}: vs cuDNN")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("speedup of sage (per forward)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sage_torch.bench_models", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.environ.get("SAGE_BENCH_OUT", "bench-out"), "models"))
    p.add_argument("--quick", action="store_true", help="tiny configurations (CPU test)")
    p.add_argument("--models", nargs="*", default=["llama", "dit"], choices=["llama", "dit"])
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="override the sizes")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not a.quick:
        print("[bench_models] no CUDA GPU visible: timing skipped (run with --quick for a CPU smoke run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    rows: list[dict] = []
    if "llama" in a.models:
        try:
            rows += bench_llama(LLAMA_QUICK if a.quick else LLAMA, a.tokens or ([64, 128] if a.quick else LLAMA_TOKENS),
                                a.iters, device, dtype)
        except ImportError as exc:
            print(f"[bench_models] llama skipped: transformers does not import ({exc})")
    if "dit" in a.models:
        rows += bench_dit(DIT_QUICK if a.quick else DIT, a.tokens or ([64, 128] if a.quick else DIT_TOKENS),
                          a.iters, device, dtype)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "commit": _commit(), "command": " ".join(["python -m sage_torch.bench_models"] + (argv if argv is not None else sys.argv[1:])),
              "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "configs": {"llama": LLAMA, "dit": DIT},
              "rows": rows}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "models.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = table(rows)
    with open(os.path.join(a.out, "models.md"), "w") as f:
        f.write(f"device {result['device']}, torch {result['torch']}, commit {result['commit']}, {result['time']}\n"
                f"command: `{result['command']}`\n\n{md}\n")
    if rows and cuda:
        plot(rows, os.path.join(a.out, "models.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
