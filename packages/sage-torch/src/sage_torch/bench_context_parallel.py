"""Context-parallel attention benchmark: ring and Ulysses over sage vs the same schemes over PyTorch SDPA.

Launched by ``ci/context_parallel.sh`` (torchrun over every visible GPU, NVLink multicast off):

    torchrun --standalone --nproc-per-node N -m sage_torch.bench_context_parallel [options]

Without torchrun it runs as a world of one process (``--device cpu`` uses gloo: the CPU tests).

Per (scheme, implementation, causal, total tokens), every rank holds ``tokens / W`` tokens
(zigzag split for the causal ring, contiguous otherwise) and reports:

* ``ms``: the whole context-parallel call (median over ``--iters`` after ``--warmup``; every
  iteration starts after a barrier), per rank, and the spread ``(max - min) / max`` across ranks;
* ``comm_ms``: the scheme's communication alone (ring: the ``W - 1`` K/V hops; Ulysses: the
  all-to-alls of q, k, v and o), per rank;
* ``compute_ms``: its attention alone (ring: the same per-step blocks with no communication,
  ``ring.NoCommRing``; Ulysses: the one local call), per rank, and its spread (the load balance);
* ``tflops``: ``4 b h S^2 d`` (halved for causal) over the slowest rank's ``ms``.

Before timing, each scheme and implementation is checked against a single-device reference on a
shorter sequence (``--ref-tokens``): float32 attention of the whole sequence (chunked), compared
per rank by relative L1, next to the error of single-device sage at that length (the recipe's
error). Writes ``context_parallel.json`` (meta with devices, versions, commit, the multicast
environment each rank saw; checks; timings; sage/SDPA speedups) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch

#: NVLink multicast stays off in every process (issue 14; the lent multi-GPU machines require it).
MULTICAST_OFF_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
SCHEMES: tuple[str, ...] = ("ring", "ulysses")
IMPLS: tuple[str, ...] = ("sage", "sdpa")
DEFAULT_TOKENS: tuple[int, ...] = (32768, 65536, 131072, 262144)
#: A context-parallel result is within the recipe's error when its rel-L1 vs the reference is at
#: most this factor times single-device sage's (plus a small absolute floor).
kCheckFactor = 1.5
kCheckFloor = 2e-3
#: SDPA-based schemes are checked against bf16/fp16 rounding only.
kSdpaCheckRelL1 = 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sage_torch.bench_context_parallel",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS),
                   help="total sequence lengths across all ranks (default: 32k 64k 128k 256k)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--causal", choices=("both", "true", "false"), default="both")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--recipe", default="auto", help="sage's recipe for every block (default auto)")
    p.add_argument("--ref-tokens", type=int, default=16384,
                   help="sequence length of the check against the single-device reference (0: no check)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="out/context_parallel", help="directory for context_parallel.json")
    p.add_argument("--quick", action="store_true",
                   help="tiny problem (CPU tests): 2 heads, d=64, 64 tokens, 1 iteration")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.heads, args.head_dim, args.ref_tokens = [64], 2, 64, 64
        args.warmup, args.iters = 0, 1
    args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
    for name in ("batch", "heads", "kv_heads", "head_dim", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heads % args.kv_heads:
        p.error(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if any(t < 1 for t in args.tokens) or args.ref_tokens < 0 or args.warmup < 0:
        p.error("--tokens must be >= 1, --ref-tokens and --warmup >= 0")
    return args


def multicast_env() -> dict[str, dict[str, str | None]]:
    """Sets the multicast-off variables where they are missing (NCCL and NVSHMEM read them when a
    communicator is created, i.e. after this) and says what each was when the process started."""
    seen = {}
    for name, value in MULTICAST_OFF_ENV.items():
        inherited = os.environ.get(name)
        if inherited is None:
            os.environ[name] = value
        seen[name] = {"inherited": inherited, "now": os.environ[name]}
    return seen


# ----------------------------------------------------------------------------- the per-block functions


def _flash_lse(q, k, v, *, is_causal: bool, scale: float | None):
    """PyTorch's flash SDPA on (b, h, s, d) views, with its natural-log LSE (b, h, s) float32."""
    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)
    return out[0], out[1]


def sdpa_block(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str, is_causal: bool,
               scale: float | None, return_lse: bool):
    """The SDPA baseline's per-block attention (``attention_fn`` of ring/Ulysses).

    CUDA: PyTorch's flash SDPA kernel, which returns the LSE (K/V heads repeated for GQA; causal
    blocks are square here, where its top-left mask is sage's bottom-right one). CPU: sage's
    PyTorch fallback (float32 math with the LSE)."""
    if q.device.type != "cuda":
        from ._torch_fallback import torch_attention
        o, lse = torch_attention(q, k, v, layout=layout, is_causal=is_causal,
                                 scale=scale if scale is not None else q.shape[-1] ** -0.5, return_lse=return_lse)
        return (o, lse) if return_lse else o
    qb, kb, vb = (t.transpose(1, 2) if layout == "bshd" else t for t in (q, k, v))
    if kb.shape[1] != qb.shape[1]:
        rep = qb.shape[1] // kb.shape[1]
        kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
    if is_causal and qb.shape[2] != kb.shape[2]:
        raise ValueError("sdpa_block: causal blocks must be square (flash SDPA's causal mask is top-left aligned)")
    o, lse = _flash_lse(qb, kb, vb, is_causal=is_causal, scale=scale)
    o = (o.transpose(1, 2) if layout == "bshd" else o).contiguous()
    return (o, lse.float().contiguous()) if return_lse else o


def check_sdpa_lse(device: torch.device, dtype: torch.dtype) -> float:
    """The flash SDPA LSE is natural log (the merge needs it): max |difference| to float32 math on a
    small problem; raises when it is not."""
    from ._torch_fallback import torch_attention
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, 96, 2, 64, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    _, lse = sdpa_block(q, k, v, layout="bshd", is_causal=True, scale=None, return_lse=True)
    _, want = torch_attention(q, k, v, layout="bshd", is_causal=True, scale=64 ** -0.5, return_lse=True)
    err = float((lse - want).abs().max())
    if not err < 1e-2:
        raise RuntimeError(f"PyTorch's flash SDPA LSE differs from the natural-log LSE by {err:.3g}: the SDPA "
                           f"baseline cannot be merged; see sdpa_block in {__file__}")
    return err


def block_fn(impl: str, recipe: str) -> Callable[..., Any]:
    if impl == "sdpa":
        return sdpa_block
    from . import api
    return functools.partial(api.attention, recipe=recipe)


# ----------------------------------------------------------------------------- one process group


def init(args: argparse.Namespace) -> tuple[int, int, torch.device, str]:
    """(rank, world size, device, backend). Under torchrun: its environment; else a world of one."""
    import torch.distributed as dist
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    else:
        store = tempfile.NamedTemporaryFile(prefix="sage_cp_store_", delete=False)
        store.close()
        os.unlink(store.name)
        if args.device == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, init_method=f"file://{store.name}", rank=0, world_size=1)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device, backend


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on this rank; every iteration starts after a barrier."""
    import torch.distributed as dist
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _gather(value: Any) -> list[Any]:
    import torch.distributed as dist
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _spread(values: list[float]) -> float:
    return (max(values) - min(values)) / max(values) if max(values) > 0 else 0.0


# ----------------------------------------------------------------------------- the schemes


def _shard_spec(scheme: str, causal: bool) -> str:
    return "zigzag" if scheme == "ring" and causal else "contiguous"


def run_scheme(scheme: str, q, k, v, *, causal: bool, block: Callable[..., Any], return_lse: bool = False,
               comm=None):
    from .distributed import ring_attention, ulysses_attention
    if scheme == "ring":
        return ring_attention(q, k, v, is_causal=causal, layout="bshd", sharding=_shard_spec(scheme, causal),
                              return_lse=return_lse, attention_fn=block, comm=comm)
    return ulysses_attention(q, k, v, is_causal=causal, layout="bshd", return_lse=return_lse, attention_fn=block)


def comm_only(scheme: str, q, k, v) -> Callable[[], Any]:
    """The scheme's communication without its attention, on this rank's shards."""
    import torch.distributed as dist

    from .distributed.ring import RingComm
    from .distributed.ulysses import heads_to_seq, seq_to_heads
    world = dist.get_world_size()
    if scheme == "ring":
        comm = RingComm() if world > 1 else None
        kv = torch.stack([k, v])

        def ring():
            buf = kv
            for _ in range(world - 1):
                buf = comm.wait(comm.start(buf))
            return buf
        return ring

    def ulysses():
        q_h = seq_to_heads(q, world)
        seq_to_heads(k, world)
        seq_to_heads(v, world)
        return heads_to_seq(q_h, world)  # o has q_h's shape
    return ulysses


def compute_only(scheme: str, q, k, v, *, causal: bool, block: Callable[..., Any]) -> Callable[[], Any]:
    """The scheme's attention without its communication, with this rank's block shapes."""
    import torch.distributed as dist

    from .distributed.ring import NoCommRing
    rank, world = dist.get_rank(), dist.get_world_size()
    if scheme == "ring":
        return lambda: run_scheme("ring", q, k, v, causal=causal, block=block, comm=NoCommRing(rank, world))
    b, s_local, h, d = q.shape
    h_kv = k.shape[2]
    q_h = q.new_empty(b, s_local * world, h // world, d).normal_()
    kv_heads = max(1, h_kv // world)
    k_h = k.new_empty(b, s_local * world, kv_heads, d).normal_()
    v_h = torch.empty_like(k_h).normal_()
    return lambda: block(q_h, k_h, v_h, layout="bshd", is_causal=causal, scale=None, return_lse=False)


def _full_inputs(args, tokens: int, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def make(h):
        return torch.randn(args.batch, tokens, h, args.head_dim, generator=gen).to(device=device, dtype=dtype)
    return make(args.heads), make(args.kv_heads), make(args.kv_heads)


def _rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64, r64 = a.double(), ref.double()
    return float((a64 - r64).abs().sum() / r64.abs().sum().clamp_min(1e-30))


def check(args, scheme: str, impl: str, causal: bool, rank: int, world: int, device, dtype) -> dict[str, Any]:
    """One scheme vs the float32 single-device reference at --ref-tokens, on this rank's shard."""
    from . import api
    from ._torch_fallback import torch_attention
    from .distributed import shard_sequence
    tokens = args.ref_tokens
    q, k, v = _full_inputs(args, tokens, device, dtype, seed=1234)
    ref, _ = torch_attention(q.float(), k.float(), v.float(), layout="bshd", is_causal=causal,
                             scale=args.head_dim ** -0.5, return_lse=True)
    spec = _shard_spec(scheme, causal)
    mine = [shard_sequence(t, world, rank, dim=1, sharding=spec) for t in (q, k, v)]
    out = run_scheme(scheme, *mine, causal=causal, block=block_fn(impl, args.recipe))
    ref_mine = shard_sequence(ref, world, rank, dim=1, sharding=spec)
    err = _rel_l1(out, ref_mine)
    row: dict[str, Any] = {"scheme": scheme, "impl": impl, "causal": causal, "tokens": tokens, "rank": rank,
                           "rel_l1": err}
    if impl == "sage":
        single = api.attention(q, k, v, layout="bshd", is_causal=causal, recipe=args.recipe)
        single_err = _rel_l1(shard_sequence(single, world, rank, dim=1, sharding=spec), ref_mine)
        row.update(single_device_rel_l1=single_err, bound=kCheckFactor * single_err + kCheckFloor)
    else:
        row.update(bound=kSdpaCheckRelL1)
    row["ok"] = bool(err <= row["bound"])
    return row


def measure(args, scheme: str, impl: str, causal: bool, tokens: int, rank: int, world: int, device, dtype
            ) -> dict[str, Any]:
    local = tokens // world
    gen = torch.Generator(device="cpu").manual_seed(100 + rank)

    def make(h):
        return torch.randn(args.batch, local, h, args.head_dim, generator=gen).to(device=device, dtype=dtype)
    q, k, v = make(args.heads), make(args.kv_heads), make(args.kv_heads)
    block = block_fn(impl, args.recipe)
    ms = time_ms(lambda: run_scheme(scheme, q, k, v, causal=causal, block=block), device, args.warmup, args.iters)
    comm_ms = time_ms(comm_only(scheme, q, k, v), device, min(args.warmup, 1), args.iters) if world > 1 else 0.0
    compute_ms = time_ms(compute_only(scheme, q, k, v, causal=causal, block=block), device, args.warmup, args.iters)
    return {"ms": ms, "comm_ms": comm_ms, "compute_ms": compute_ms}


def _meta(args, world: int, device: torch.device, backend: str, env_seen: list[Any]) -> dict[str, Any]:
    from . import __version__, _dispatch
    root = pathlib.Path(__file__).resolve().parents[4]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if device.type == "cuda" else ["cpu"])
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    try:
        decision = _dispatch.resolve(_dispatch.device_arch(device), dtype, args.head_dim, args.recipe).describe()
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal
        decision = {"error": f"{type(exc).__name__}: {exc}"}
    return {"command": " ".join([sys.executable, "-m", "sage_torch.bench_context_parallel", *sys.argv[1:]]),
            "args": vars(args), "world_size": world, "backend": backend, "devices": devices,
            "torch": torch.__version__, "cuda": torch.version.cuda, "sage_torch": __version__, "commit": commit,
            "multicast_env_per_rank": env_seen, "sage_block_decision": decision,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = multicast_env()
    import torch.distributed as dist
    rank, world, device, backend = init(args)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    causal_modes = {"both": (False, True), "true": (True,), "false": (False,)}[args.causal]
    fallbacks: set[str] = set()
    try:
        env_seen = _gather(env)
        result: dict[str, Any] = {"meta": _meta(args, world, device, backend, env_seen), "checks": [], "timings": []}
        if "sdpa" in args.impls and device.type == "cuda":
            result["meta"]["sdpa_lse_check_max_abs"] = check_sdpa_lse(device, dtype)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for scheme in args.schemes:
                if scheme == "ulysses" and (args.heads % world or (args.kv_heads % world and world % args.kv_heads)):
                    result["timings"].append({"scheme": scheme, "skipped": f"heads {args.heads}/{args.kv_heads} do "
                                              f"not split over {world} ranks"})
                    continue
                for impl in args.impls:
                    for causal in causal_modes:
                        if args.ref_tokens:
                            rows = _gather(check(args, scheme, impl, causal, rank, world, device, dtype))
                            result["checks"].append({"scheme": scheme, "impl": impl, "causal": causal,
                                                     "tokens": args.ref_tokens, "ok": all(r["ok"] for r in rows),
                                                     "per_rank": rows})
                        for tokens in args.tokens:
                            parts = 2 * world if scheme == "ring" and causal else world
                            if tokens % parts:
                                result["timings"].append({"scheme": scheme, "impl": impl, "causal": causal,
                                                          "tokens": tokens, "skipped": f"tokens not a multiple of "
                                                          f"{parts}"})
                                continue
                            rows = _gather(measure(args, scheme, impl, causal, tokens, rank, world, device, dtype))
                            result["timings"].append(_timing_row(args, scheme, impl, causal, tokens, rows))
            fallbacks.update(str(w.message) for w in caught if "sage" in str(w.message).lower())
        result["sage_warnings"] = sorted(set().union(*_gather(sorted(fallbacks))))  # every rank's
        result["speedups"] = _speedups(result["timings"])
        if rank == 0:
            out = pathlib.Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "context_parallel.json").write_text(json.dumps(result, indent=1))
            print(format_table(result))
            print(f"wrote {out / 'context_parallel.json'}")
        return result
    finally:
        dist.destroy_process_group()


def _timing_row(args, scheme, impl, causal, tokens, rows) -> dict[str, Any]:
    ms = [r["ms"] for r in rows]
    flops = 4 * args.batch * args.heads * tokens * tokens * args.head_dim / (2 if causal else 1)
    return {"scheme": scheme, "impl": impl, "causal": causal, "tokens": tokens,
            "ms_per_rank": ms, "ms": max(ms), "spread": _spread(ms),
            "comm_ms_per_rank": [r["comm_ms"] for r in rows],
            "compute_ms_per_rank": [r["compute_ms"] for r in rows],
            "compute_spread": _spread([r["compute_ms"] for r in rows]),
            "tflops": flops / (max(ms) * 1e-3) / 1e12 if max(ms) > 0 else None}


def _speedups(timings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(t["scheme"], t["impl"], t["causal"], t["tokens"]): t for t in timings if "ms" in t}
    out = []
    for (scheme, impl, causal, tokens), row in by_key.items():
        base = by_key.get((scheme, "sdpa", causal, tokens))
        if impl == "sage" and base is not None and row["ms"] > 0:
            out.append({"scheme": scheme, "causal": causal, "tokens": tokens, "sage_over_sdpa": base["ms"] / row["ms"]})
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"world size {result['meta']['world_size']} on {', '.join(result['meta']['devices'])}"]
    for c in result["checks"]:
        worst = max(r["rel_l1"] for r in c["per_rank"])
        lines.append(f"check {c['scheme']:>7} {c['impl']:>4} causal={c['causal']!s:5} {c['tokens']:>7} tok: "
                     f"rel-L1 {worst:.2e} {'ok' if c['ok'] else 'FAILED'}")
    lines.append(f"{'scheme':>7} {'impl':>4} {'causal':>6} {'tokens':>7} {'ms':>9} {'spread':>7} {'comm ms':>9} "
                 f"{'compute ms':>10} {'c.spread':>8} {'TFLOPS':>7}")
    for t in result["timings"]:
        if "skipped" in t:
            lines.append(f"{t['scheme']:>7} {t.get('impl', ''):>4} skipped: {t['skipped']}")
            continue
        lines.append(f"{t['scheme']:>7} {t['impl']:>4} {t['causal']!s:>6} {t['tokens']:>7} {t['ms']:>9.2f} "
                     f"{t['spread']:>7.1%} {max(t['comm_ms_per_rank']):>9.2f} {max(t['compute_ms_per_rank']):>10.2f} "
                     f"{t['compute_spread']:>8.1%} {t['tflops'] or 0:>7.1f}")
    for s in result["speedups"]:
        lines.append(f"sage/sdpa {s['scheme']:>7} causal={s['causal']!s:5} {s['tokens']:>7} tok: "
                     f"{s['sage_over_sdpa']:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
