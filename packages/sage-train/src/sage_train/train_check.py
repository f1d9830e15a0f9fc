"""A real training check: a small GPT trained from scratch with sage_train against the same run on SDPA.

    python -m sage_train.train_check [--steps 300] [--layers 4] [--width 512] [--heads 8]
                                     [--seq 512] [--batch 16] [--out DIR] [--quick]

The text is what ships on the machine: the long descriptions (``Description`` / payload) of the
installed Python distributions, read through ``importlib.metadata``, in name order, as UTF-8
bytes (a 256-symbol byte vocabulary: no tokenizer to download). The last 10 % is held out.

The model is a pre-norm GPT (learned positions, causal self-attention through
``F.scaled_dot_product_attention``, 4x GELU MLP, tied embeddings) under bf16 autocast with fp32
weights and AdamW. Two runs from one seed (same initial weights, same batches, same dropout-free
model): ``sdpa`` (PyTorch's SDPA) and ``sage`` (the same model under :func:`sage_train.patch_model`,
so every attention call trains with train_s8). Reported: the loss of every step, the held-out loss
every ``--eval-every`` steps and at the end, the final losses' relative difference, the median
step time, and the attention alone (forward + backward of one call at the model's shape, both
ways, CUDA events) so "the attention part of a step" is compared directly. It also records what
sage_train ran (its kernel, or the emulation, which is slow: the check is meant for the kernel).

Writes ``train_check.json`` (device, versions, commit, command, corpus, config, curves),
``train_check.md`` and ``train_check.png`` (matplotlib optional) under ``--out``. ``--quick`` (forced
without a GPU): a one-layer toy model for a few steps on the CPU, so the command, the data path and
the output format are checked anywhere (CI runs it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sage_torch._env import ENV_FORCE_EMULATION, env_flag
from sage_torch.bench import commit

import sage_train

from . import _dispatch

QUICK = dict(steps=4, layers=1, width=64, heads=2, seq=64, batch=2, eval_every=2, eval_batches=1, attn_iters=2)
HELD_OUT = 0.1  # fraction of the corpus held out
MIN_CORPUS_BYTES = 4096


# ----------------------------------------------------------------------------- data

def corpus_bytes() -> tuple[bytes, Dict[str, Any]]:
    """The installed distributions' long descriptions, in name order, as one UTF-8 byte string, and
    a description of it (distributions, bytes). Deterministic on one machine."""
    texts = []
    names = []
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        name = meta.get("Name") or ""
        text = meta.get_payload() if hasattr(meta, "get_payload") else None
        if not text:
            text = meta.get("Description") or ""
        if name and text and text.strip() and text.strip() != "UNKNOWN":
            texts.append((name.lower(), text))
    texts.sort()
    seen = set()
    parts = []
    for name, text in texts:
        if name in seen:  # a distribution installed twice (two sys.path entries): once
            continue
        seen.add(name)
        names.append(name)
        parts.append(text.strip() + "\n\n")
    data = "".join(parts).encode("utf-8", errors="replace")
    return data, {"source": "importlib.metadata long descriptions", "distributions": len(names),
                  "bytes": len(data), "first": names[:5]}


def split_tokens(data: bytes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long)
    cut = int(len(tokens) * (1.0 - HELD_OUT))
    return tokens[:cut].to(device), tokens[cut:].to(device)


def batch_starts(n_tokens: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """(steps, batch) start offsets, drawn once from ``seed``: both runs see the same batches."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq - 1, (steps, batch), generator=g)


def get_batch(tokens: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.to(tokens.device).unsqueeze(1) + torch.arange(seq + 1, device=tokens.device)
    chunk = tokens[idx]
    return chunk[:, :-1], chunk[:, 1:]


# ----------------------------------------------------------------------------- model

class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # looked up per call: patch_model reaches it
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))


class TinyGPT(nn.Module):
    def __init__(self, layers: int, width: int, heads: int, seq: int, vocab: int = 256) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x) @ self.tok.weight.t()  # tied output head


# ----------------------------------------------------------------------------- runs

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def train_run(name: str, a, device: torch.device, train: torch.Tensor, held: torch.Tensor,
              starts: torch.Tensor, eval_starts: torch.Tensor) -> Dict[str, Any]:
    """One training run from seed ``a.seed``; ``name == "sage"`` patches the model with sage_train."""
    torch.manual_seed(a.seed)
    model = TinyGPT(a.layers, a.width, a.heads, a.seq).to(device)
    if name == "sage":
        sage_train.patch_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())

    def evaluate() -> float:
        model.eval()
        losses = []
        with torch.no_grad(), autocast:
            for i in range(eval_starts.shape[0]):
                x, y = get_batch(held, eval_starts[i], a.seq)
                losses.append(float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())))
        model.train()
        return sum(losses) / len(losses)

    losses, evals, step_ms = [], [], []
    for step in range(a.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, a.steps, a.lr, a.warmup)
        x, y = get_batch(train, starts[step], a.seq)
        _sync(device)
        t0 = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        _sync(device)
        step_ms.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            evals.append({"step": step + 1, "loss": evaluate()})
    timed = step_ms[min(len(step_ms) - 1, a.warmup_steps_untimed):]
    return {"run": name, "train_loss": losses, "eval": evals, "final_eval_loss": evals[-1]["loss"] if evals else None,
            "final_train_loss": losses[-1] if losses else None, "step_ms_median": statistics.median(timed),
            "steps_done": len(losses)}


def attention_ms(a, device: torch.device) -> Dict[str, float]:
    """Forward + backward of one attention call at the model's shape (bf16 on a GPU), median ms:
    PyTorch's SDPA and sage_train, the same inputs and dO."""
    d = a.width // a.heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(a.seed)
    q, k, v = (torch.randn(a.batch, a.heads, a.seq, d, device=device, dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    do = torch.randn(a.batch, a.heads, a.seq, d, device=device, dtype=dtype, generator=g)
    out = {}
    for name, fn in (("sdpa", lambda: sage_train.torch_sdpa(q, k, v, is_causal=True)),
                     ("sage", lambda: sage_train.attention(q, k, v, is_causal=True))):
        times = []
        for i in range(a.attn_iters + 2):
            _sync(device)
            t0 = time.perf_counter()
            torch.autograd.grad(fn(), (q, k, v), do)
            _sync(device)
            if i >= 2:
                times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times)
    return out


def sage_ran(a, device: torch.device) -> str:
    """What sage_train runs for the model's attention calls (kernel or emulation, with the reason)."""
    d = a.width // a.heads
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.empty(a.batch, a.heads, a.seq, d, device=device, dtype=dtype)
    if env_flag(ENV_FORCE_EMULATION):
        return f"emulation ({ENV_FORCE_EMULATION} is set)"
    spec, why = _dispatch.select(q, q, q, layout="bhsd", is_causal=True, scale=d ** -0.5, dp_precision="fp16",
                                 smooth_k=True)
    return f"kernel {spec.name}" if spec is not None else f"emulation ({why})"


# ----------------------------------------------------------------------------- report

def write_report(result: Dict[str, Any], out_dir: str, plot: bool) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_check.json"), "w") as f:
        json.dump(result, f, indent=1)
    runs = {r["run"]: r for r in result["runs"]}
    m = result["meta"]
    lines = [f"device {m['device']}, torch {m['torch']}, commit {m['commit']}, {m['time']}",
             f"command: `{m['command']}`",
             f"corpus: {m['corpus']['bytes']} bytes from {m['corpus']['distributions']} distributions "
             f"({m['corpus']['source']}); model: {m['config']}",
             f"sage_train ran: {m['sage_ran']}", "",
             "| run | steps | final train loss | final held-out loss | step ms (median) |",
             "|---|---|---|---|---|"]
    for name in ("sdpa", "sage"):
        r = runs.get(name)
        if r:
            lines.append(f"| {name} | {r['steps_done']} | {r['final_train_loss']:.4f} | "
                         f"{r['final_eval_loss']:.4f} | {r['step_ms_median']:.1f} |")
    s = result["summary"]
    lines += ["", f"held-out loss, sage vs sdpa: {s['final_eval_rel_diff'] * 100:+.2f} % (issue 10: within 1 %)",
              f"attention alone (fwd+bwd of one call, ms): sdpa {s['attention_ms']['sdpa']:.3f}, "
              f"sage {s['attention_ms']['sage']:.3f} ({s['attention_ms']['sdpa'] / s['attention_ms']['sage']:.2f}x)"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "train_check.md"), "w") as f:
        f.write(text)
    print(text)
    if not plot:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the plot is optional
        print("[train_check] matplotlib not available: no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], label=f"{name} train", alpha=0.6)
        ax.plot([e["step"] for e in r["eval"]], [e["loss"] for e in r["eval"]], marker="o", label=f"{name} held out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.legend()
    ax.set_title(f"TinyGPT {m['config']['layers']}x{m['config']['width']}, {m['device']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "train_check.png"), dpi=120)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sage_train.train_check", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8, help="head dim = width / heads (64 by default)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30, help="learning-rate warm-up steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--attn-iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quick", action="store_true", help="the tiny CPU run (forced without a GPU)")
    p.add_argument("--out", default=os.environ.get("SAGE_TRAIN_CHECK_OUT", "bench-out/train_check"))
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not a.quick else "cpu")
    if device.type == "cpu":
        if not a.quick:
            print("[train_check] no CUDA GPU: running the --quick CPU check instead (toy model, a few steps)")
        for key, value in QUICK.items():
            setattr(a, key, value)
    a.warmup = min(a.warmup, max(1, a.steps // 10))
    a.warmup_steps_untimed = min(3, max(0, a.steps - 1))
    data, corpus = corpus_bytes()
    if len(data) < MIN_CORPUS_BYTES:
        print(f"[train_check] only {len(data)} bytes of package descriptions on this machine (need "
              f"{MIN_CORPUS_BYTES}): nothing to train on")
        return 1
    train, held = split_tokens(data, device)
    if len(held) <= a.seq + 1:
        print(f"[train_check] the held-out text ({len(held)} bytes) is shorter than --seq {a.seq}")
        return 1
    starts = batch_starts(len(train), a.seq, a.batch, a.steps, a.seed)
    eval_starts = batch_starts(len(held), a.seq, a.batch, a.eval_batches, a.seed + 1)
    config = {k: getattr(a, k) for k in ("layers", "width", "heads", "seq", "batch", "steps", "lr", "seed")}
    config["head_dim"] = a.width // a.heads
    ran = sage_ran(a, device)
    print(f"[train_check] {device}, corpus {corpus['bytes']} bytes; sage_train runs: {ran}")
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        for name in ("sdpa", "sage"):
            t0 = time.perf_counter()
            runs.append(train_run(name, a, device, train, held, starts, eval_starts))
            print(f"[train_check] {name}: {runs[-1]['steps_done']} steps in {time.perf_counter() - t0:.1f} s, "
                  f"held-out loss {runs[-1]['final_eval_loss']}")
        attn = attention_ms(a, device)
    by = {r["run"]: r for r in runs}
    base, sage = by["sdpa"]["final_eval_loss"], by["sage"]["final_eval_loss"]
    rel = (sage - base) / base if base and sage is not None else float("nan")
    result = {
        "meta": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "torch": torch.__version__, "commit": commit(),
                 "command": " ".join([os.path.basename(sys.executable), "-m", "sage_train.train_check"]
                                     + (argv if argv is not None else sys.argv[1:])),
                 "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "corpus": corpus,
                 "config": config, "sage_ran": ran, "quick": device.type == "cpu"},
        "runs": runs,
        "summary": {"final_eval_rel_diff": rel, "attention_ms": attn},
    }
    write_report(result, a.out, plot=not a.no_plot)
    finite = all(math.isfinite(r["final_train_loss"] or float("nan")) for r in runs)
    return 0 if finite else 1


if __name__ == "__main__":
    sys.exit(main())
