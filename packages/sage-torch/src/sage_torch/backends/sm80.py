"""sm80 mma.sync attention kernels (Ampere/Ada; also built for sm_90a and Blackwell) as sage_torch backends.

One function per recipe, ``fn(q, k, v, *, layout, is_causal, scale, return_lse, **options) ->
(o, lse | None)``: quantize Q, K (and V for the 8-bit PV recipes) with ``sage_quant.ops`` (CUDA
kernels when compiled in, else the bit-exact references), launch
``sage_core.attn_fwd_sm80_<recipe>`` on the current stream, add the K-smoothing term back to
the LSE. Contract: ``sage_torch/backends/README.md``; numerics: docs/design/NUMERICS.md; kernel:
``kernels/include/sage/sm80/sm80_attn_fwd_kernel_mma_sync.cuh``.

Kernel facts that options must respect (``supports`` vetoes anything else, with the reason):
  * the online softmax steps over 64-key tiles: ``kv_block`` must be 64 (also the default here,
    while ``sage_quant.RECIPES`` defaults e4m3 recipes to the Hopper tile 128);
  * ``qk_s8_pv_f16`` computes P·V in fp16 (bf16 V is converted to fp16 in shared memory, as the
    original SageAttention does): ``pv_dtype="fp16"``; a bf16 V channel beyond FP16's range is
    divided by a power of two first and O's channel multiplied back (``sage_quant.reference.
    v_fp16_range_scale``; the emulation does the same);
  * Q smoothing (``smooth_q``) only in ``qk_s4_pv_e4m3``, with ``delta_s="quantized_k"`` and
    ``q_block`` a multiple of 64; e4m3 recipes: the hardware accumulator (``acc_mantissa_bits``
    default) and ``pv_accum="two_level"``;
  * ``pv_accum="f16_buffer"`` (``qk_s8_pv_f16`` and ``qk_s8_pv_e4m3``): each 64-key tile's P·V in
    an FP16 MMA accumulator (twice the FP32-accumulate rate on GeForce Ampere/Ada), added into
    FP32 O; a tile whose buffer overflows is recomputed in FP32. For E4M3, V is quantized with
    ``v_max`` 2.25 so that a tile cannot overflow (64 x 448 x 2.25 < 65504);
  * the build must hold code the device loads (:func:`arch_build_reason`: a 100a cubin does not
    run on a B300, sm_103): a 90a-only build on an RTX 50 is vetoed, never launched.

8-bit V formats (docs/design/quant-formats.md): ``v_s8_t_p32`` / ``v_e4m3_t_p32`` = the per-channel
``v_s8`` / ``v_e4m3_t`` values, transposed to ``(b, h_kv, d, s_pad)`` (``s_pad = ceil(s/128)*128``,
zero padded) with the tokens of each 32-token chunk permuted by :data:`PERM32`, so that the
INT8/E4M3 P fragment built from the S accumulator needs no shuffles.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Optional

import torch

import sage_quant

try:  # imported lazily so that the format helpers (PERM32, quant_v_t_p32) work without it
    import sage_core
except ImportError as _exc:  # available() reports it; the backends are registered but unavailable
    sage_core = None
    _SAGE_CORE_ERROR: Optional[BaseException] = _exc
else:
    _SAGE_CORE_ERROR = None
from sage_quant import ops as _qops
from sage_quant import reference as _ref

from . import register_backend
from .. import _dispatch
from .._layout import empty_output

__all__ = [
    "RECIPES",
    "PERM32",
    "kKvTile",
    "kCtaRows",
    "resolve_options",
    "unsupported_reason",
    "grid_limit_reason",
    "quant_v_t_p32",
    "kernel_names",
    "emulated_mmas",
    "attn_qk_s8_pv_f16",
    "attn_qk_s8_pv_s8",
    "attn_qk_s8_pv_e4m3",
    "attn_qk_s4_pv_e4m3",
]

kKvTile = 64  # keys per online-softmax step of the kernel (kSm80BlockN)
kCtaRows = 64  # query rows per CTA (kSm80BlockM): Q smoothing blocks must be multiples
kVChunk = 32  # tokens of one 8-bit k32 MMA: the permutation period of v_*_t_p32
kVTokenPad = _ref.kVTokenPad  # 128, as v_e4m3_t
kRowAlignBytes = 16  # cp.async rows
kMaxGridYZ = 65535  # CUDA grid dims y (heads) and z (batch)
HEAD_DIMS = (64, 128)

RECIPES = ("qk_s8_pv_f16", "qk_s8_pv_s8", "qk_s8_pv_e4m3", "qk_s4_pv_e4m3")
_QK_BITS = {"qk_s8_pv_f16": 8, "qk_s8_pv_s8": 8, "qk_s8_pv_e4m3": 8, "qk_s4_pv_e4m3": 4}
_V_FMT = {"qk_s8_pv_s8": "s8", "qk_s8_pv_e4m3": "e4m3", "qk_s4_pv_e4m3": "e4m3"}
# Arch families (docs/design/ARCHITECTURE.md §Runtime dispatch): FP8 mma.sync needs sm_89; sm90 runs these only when forced
# (the sm90 module registers first and wins for the recipes it has). Blackwell keeps mma.sync: the family
# is built for 100a/103a/120a/121a and serves there until their own kernels exist (registered as ported
# there, like sm90, so a kernel written for the arch wins).
_BLACKWELL = ("sm100", "sm103", "sm120", "sm121")
_ARCHS = {
    "qk_s8_pv_f16": ("sm80", "sm86", "sm89", "sm90") + _BLACKWELL,
    "qk_s8_pv_s8": ("sm80", "sm86", "sm89", "sm90") + _BLACKWELL,
    "qk_s8_pv_e4m3": ("sm89", "sm90") + _BLACKWELL,
    "qk_s4_pv_e4m3": ("sm89", "sm90") + _BLACKWELL,
}
_PORTED_ARCHS = ("sm90",) + _BLACKWELL

# The mma.sync instructions of each recipe (QK, then P·V), and the archs whose tensor cores run them
# natively; elsewhere the compiler emulates them (FP8 on sm_90a / sm_100a / sm_103a through FP16
# HMMA, INT4 on sm_90a and Blackwell through INT8 IMMA): SASS in docs/perf/sm80_family_blackwell.md.
_MMA_OF_RECIPE = {
    "qk_s8_pv_f16": ("IMMA.S8", "HMMA.F16"),
    "qk_s8_pv_s8": ("IMMA.S8", "IMMA.S8"),
    "qk_s8_pv_e4m3": ("IMMA.S8", "QMMA.E4M3"),
    "qk_s4_pv_e4m3": ("IMMA.S4", "QMMA.E4M3"),
}
_MMA_NATIVE_ARCHS = {
    "IMMA.S8": ("sm80", "sm86", "sm89", "sm90") + _BLACKWELL,
    "HMMA.F16": ("sm80", "sm86", "sm89", "sm90") + _BLACKWELL,
    "QMMA.E4M3": ("sm89", "sm120", "sm121"),
    "IMMA.S4": ("sm80", "sm86", "sm89"),
}


def emulated_mmas(recipe: str, arch: str) -> tuple[str, ...]:
    """The mma.sync instructions of ``recipe``'s kernel that ``arch`` does not run natively (the
    compiler emulates them with others): () where every one is native. Benchmarks print it next to
    a number, since an emulated instruction measures the emulation, not the kernel's design."""
    if recipe not in _MMA_OF_RECIPE:
        raise ValueError(f"unknown sm80-family recipe {recipe!r}; known: {RECIPES}")
    return tuple(dict.fromkeys(m for m in _MMA_OF_RECIPE[recipe] if arch not in _MMA_NATIVE_ARCHS[m]))


def _perm32() -> tuple[int, ...]:
    """Slot k = 16h + 4t + 2jj + e of a 32-token chunk holds token 8(2h + jj) + 2t + e.

    The S accumulator gives lane (g, t) keys 8j + 2t + {0, 1}; the 8-bit A fragment of
    mma.m16n8k32 wants contraction slots 4t..4t+3 and 16+4t..19+4t; filling them with S n-tiles
    j = 0..3 in order gives this map (see the kernel header).
    """
    out = []
    for k in range(kVChunk):
        h, t, jj, e = k // 16, (k % 16) // 4, (k % 4) // 2, k % 2
        out.append(8 * (2 * h + jj) + 2 * t + e)
    return tuple(out)


#: v_*_t_p32: ``v_t[..., c, 32m + k] = V[..., 32m + PERM32[k], c]``.
PERM32: tuple[int, ...] = _perm32()


# Recipes with an FP16-accumulate kernel variant (pv_accum="f16_buffer"), and its name suffix.
_F16_BUFFER_RECIPES = ("qk_s8_pv_f16", "qk_s8_pv_e4m3")


def kernel_names(recipe: str, pv_accum: Optional[str] = None) -> tuple[str, ...]:
    """sage_core kernel names (has_kernel) of every configuration of ``recipe`` (its
    ``pv_accum="f16_buffer"`` variant: ``attn_sm80_<recipe>_acc_f16_...``)."""
    variant = f"{recipe}_acc_f16" if pv_accum == "f16_buffer" else recipe
    return tuple(f"attn_sm80_{variant}_hdim{d}_{io}" for d in HEAD_DIMS for io in ("f16", "bf16"))


_PERM32_CACHE: dict = {}


def _perm32_on(device: torch.device) -> torch.Tensor:
    """PERM32 as a device tensor, made once per device: building it from a Python list is a
    host-to-device copy, which syncs and cannot be captured in a CUDA graph."""
    key = (device.type, device.index)
    t = _PERM32_CACHE.get(key)
    if t is None:
        t = _PERM32_CACHE[key] = torch.tensor(PERM32, dtype=torch.long, device=device)
    return t


def quant_v_t_p32(v: torch.Tensor, fmt: str, layout: str = "bhsd",
                  v_max: float = _ref.kFp8E4m3Max) -> tuple[torch.Tensor, torch.Tensor]:
    """V per channel in 8 bits, transposed and token-permuted for the sm80 8-bit PV MMA.

    Args:
        v: ``(b, h, s, d)`` (bhsd) or ``(b, s, h, d)`` (bshd), fp16/bf16.
        fmt: ``"s8"`` (INT8, scale amax/127, ``quant_v_s8``) or ``"e4m3"`` (E4M3 bits,
            scale amax/v_max, ``quant_v_e4m3_t``).
        v_max: e4m3 only: the code a channel's amax maps to (448; 2.25 for ``f16_buffer``).

    Returns ``(v_t, v_scale)``: ``v_t`` int8 (s8) or uint8 E4M3 bits (e4m3), contiguous
    ``(b, h, d, s_pad)``, ``s_pad = ceil(s/128)*128``, zero padding, tokens of each 32-chunk in
    :data:`PERM32` order; ``v_scale`` float32 ``(b, h, d)``. Values are bit-identical to the
    shared formats (only their placement differs).
    """
    if fmt == "e4m3":
        v_t, v_scale = _qops.quantize_v_e4m3_t(v, layout=layout, v_max=v_max)  # (b,h,d,s_pad128) uint8
    elif fmt == "s8":
        v_q, v_scale = _qops.quantize_v_s8(v, layout=layout)  # (b,h,s,d) int8
        b, h, s, d = v_q.shape
        s_pad = -(-s // kVTokenPad) * kVTokenPad
        v_t = torch.zeros((b, h, d, s_pad), dtype=torch.int8, device=v_q.device)
        v_t[:, :, :, :s] = v_q.transpose(2, 3)
    else:
        raise ValueError(f"fmt must be 's8' or 'e4m3', got {fmt!r}")
    s_pad = v_t.shape[-1]
    perm = _perm32_on(v_t.device)
    idx = (torch.arange(0, s_pad, kVChunk, device=v_t.device)[:, None] + perm[None, :]).reshape(-1)
    return v_t.index_select(-1, idx).contiguous(), v_scale.contiguous()


def resolve_options(recipe: str, options: dict[str, Any]) -> dict[str, Any]:
    """The recipe's options with this backend's defaults (kv_block=64) filled in and validated
    by ``sage_quant.recipe_options`` (TypeError for unknown names, ValueError for bad values)."""
    opts = dict(options)
    opts.setdefault("kv_block", kKvTile)
    if "smooth_v" in sage_quant.RECIPES[recipe]:
        # The sm80 epilogue has no V-mean term yet: this backend's default is no V smoothing
        # (asking for it explicitly is refused below, never silently ignored).
        opts.setdefault("smooth_v", False)
    return sage_quant.recipe_options(recipe, **opts)


def unsupported_reason(recipe: str, opts: dict[str, Any]) -> Optional[str]:
    """None if the kernel implements these (resolved) options exactly, else why not."""
    defaults = sage_quant.RECIPES[recipe]
    if opts["kv_block"] != kKvTile:
        return (f"the sm80 kernel steps the softmax over {kKvTile}-key tiles: kv_block must be "
                f"{kKvTile}, got {opts['kv_block']}")
    if opts["smooth_q"]:
        if recipe != "qk_s4_pv_e4m3":
            return "Q smoothing (smooth_q=True) is implemented in the sm80 kernels for qk_s4_pv_e4m3 only"
        if opts["delta_s"] != "quantized_k":
            return f"the kernel adds dS from the dequantized K it holds: delta_s must be 'quantized_k', got {opts['delta_s']!r}"
        if opts["q_block"] % kCtaRows:
            return f"Q smoothing blocks must be multiples of the CTA's {kCtaRows} rows, got q_block={opts['q_block']}"
    if opts.get("smooth_v"):
        return ("V smoothing (smooth_v=True) is implemented by the sm90 kernel only; the sm80 "
                f"{recipe} kernel needs smooth_v=False")
    if recipe == "qk_s8_pv_f16" and opts["pv_dtype"] != "fp16":
        return f"the sm80 kernel computes P.V in fp16 (bf16 V converted to fp16): pv_dtype must be 'fp16', got {opts['pv_dtype']!r}"
    accum = opts.get("pv_accum")
    if accum == "f16_buffer" and recipe not in _F16_BUFFER_RECIPES:
        return (f"pv_accum='f16_buffer' has sm80 kernels for {_F16_BUFFER_RECIPES} only; "
                f"{recipe} accumulates two-level in FP32")
    if "acc_mantissa_bits" in opts and accum not in ("two_level", "f16_buffer"):
        return ("the sm80 e4m3 kernels accumulate per 64-key tile in an FP32 or FP16 buffer: "
                f"pv_accum must be 'two_level' or 'f16_buffer', got {accum!r}")
    if "acc_mantissa_bits" in opts:
        if opts["acc_mantissa_bits"] != defaults["acc_mantissa_bits"]:
            return ("acc_mantissa_bits models the hardware FP8 accumulator (emulation only); the kernel "
                    f"cannot change it: leave it at {defaults['acc_mantissa_bits']}")
    return None


# Output allocator (tests swap in a NaN-filling one to poison outputs).
_alloc = torch.empty


def _aligned_rows(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (t.data_ptr() % kRowAlignBytes == 0
            and all((st * es) % kRowAlignBytes == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1))


def _run(recipe: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str,
         is_causal: bool, scale: float, return_lse: bool, **options: Any):
    opts = resolve_options(recipe, options)
    reason = unsupported_reason(recipe, opts)
    if reason is not None:
        raise ValueError(f"sm80 backend, recipe {recipe}: {reason}")
    bits = _QK_BITS[recipe]
    qb, kb, vb = (_ref.to_bhsd(t, layout) for t in (q, k, v))
    b, h_q, s_q, d = qb.shape
    h_kv = kb.shape[1]
    dev = q.device

    k_mean = _qops.quantize_token_mean(k, layout=layout) if opts["smooth_k"] else None
    q_mean = None
    if recipe == "qk_s4_pv_e4m3":
        q_block = opts["q_block"]
        if opts["smooth_q"]:
            q_mean = _qops.quantize_block_mean(q, q_block, layout=layout)
            q_mean_arg = q_mean
        else:  # same kernel, dS = 0
            q_mean_arg = torch.zeros((b, h_q, -(-s_q // q_block), d), dtype=torch.float32, device=dev)
    q_vals, q_scale = _qops.quantize_int(q, bits=bits, granularity=opts["q_granularity"], role="q",
                                         block=opts["q_block"], mean=q_mean, mean_block=opts["q_block"],
                                         layout=layout)
    k_vals, k_scale = _qops.quantize_int(k, bits=bits, granularity=opts["k_granularity"], role="k",
                                         block=opts["k_block"], mean=k_mean, layout=layout)

    o = empty_output(q, layout, alloc=_alloc)  # q's memory order (sage_torch._layout); stored by strides
    ob = _ref.to_bhsd(o, layout)
    lse = _alloc((b, h_q, s_q), dtype=torch.float32, device=dev) if return_lse else None
    stream = torch.cuda.current_stream(dev).cuda_stream
    common = dict(q_granularity=opts["q_granularity"], q_block=int(opts["q_block"]),
                  k_granularity=opts["k_granularity"], k_block=int(opts["k_block"]),
                  softmax_scale=float(scale), is_causal=bool(is_causal), stream=stream)
    if recipe in _F16_BUFFER_RECIPES:
        common["pv_accum"] = opts["pv_accum"]
    v_range = None
    if recipe == "qk_s8_pv_f16":
        if vb.dtype != torch.float16:
            # The kernel converts bf16 V to FP16: a channel beyond 65504 would be Inf in every row.
            # Divide such channels by a power of two and multiply O's channel back (exact; f = 1
            # for channels in range). Costs one amax pass and one scaled copy of V, one pass over O.
            v_range = _ref.v_fp16_range_scale(vb)  # (b, h_kv, d)
            vb = (vb * (1.0 / v_range)[:, :, None, :].to(vb.dtype)).contiguous()
        if not _aligned_rows(vb):  # the kernel reads V in place with 16-byte cp.async rows
            vb = vb.contiguous()
        sage_core.attn_fwd_sm80_qk_s8_pv_f16(q_vals, k_vals, vb, ob, lse, q_scale, k_scale, **common)
        if v_range is not None:
            rep = h_q // h_kv
            f = v_range.repeat_interleave(rep, dim=1) if rep > 1 else v_range
            ob.mul_(f[:, :, None, :].to(ob.dtype))
    else:
        v_max = opts.get("v_max", _ref.kFp8E4m3Max)
        v_t, v_scale = quant_v_t_p32(v, _V_FMT[recipe], layout=layout, v_max=v_max)
        if recipe == "qk_s4_pv_e4m3":
            sage_core.attn_fwd_sm80_qk_s4_pv_e4m3(q_vals, k_vals, v_t, ob, lse, q_scale, k_scale, v_scale,
                                                  q_mean_arg, q_mean_block=int(opts["q_block"]), **common)
        else:
            fn = getattr(sage_core, f"attn_fwd_sm80_{recipe}")
            fn(q_vals, k_vals, v_t, ob, lse, q_scale, k_scale, v_scale, **common)

    if lse is not None and k_mean is not None:
        # Softmax ignores the per-row constant q.k_mean; the LSE of the unsmoothed scores needs it.
        rep = h_q // h_kv
        km = k_mean.repeat_interleave(rep, dim=1) if rep > 1 else k_mean
        lse += torch.einsum("bhsd,bhd->bhs", qb.to(torch.float32), km) * float(scale)
    return o, lse


def _make_fn(recipe: str):
    def fn(q, k, v, *, layout: str, is_causal: bool, scale: float, return_lse: bool, **options):
        return _run(recipe, q, k, v, layout=layout, is_causal=is_causal, scale=scale,
                    return_lse=return_lse, **options)

    fn.__name__ = fn.__qualname__ = f"attn_{recipe}"
    fn.__doc__ = (f"{recipe} on the sm80 mma.sync kernel: (o, lse | None); q, k, v fp16/bf16 CUDA in "
                  f"``layout`` ('bhsd' or 'bshd'), head dim 64/128; see the module docstring.")
    return fn


def grid_limit_reason(q: torch.Tensor, layout: str) -> Optional[str]:
    """The kernel's grid is (q tiles, h_q, b) and the quantizers' (tiles, h, b): CUDA caps grid
    dims y and z at 65535, so larger batch or head counts are declined (dispatch falls back and
    says why) instead of reaching sage_core's launch check."""
    b, h_q = q.shape[0], (q.shape[1] if layout == "bhsd" else q.shape[2])
    if b > kMaxGridYZ or h_q > kMaxGridYZ:
        return (f"the sm80 kernel launches one CTA row per (head, batch): batch and q heads must be "
                f"<= {kMaxGridYZ} (CUDA grid y/z limit), got batch={b}, heads={h_q}")
    return None


# Lowest __CUDA_ARCH__/10 whose cubin holds the recipe's MMAs (below it the kernel is empty).
_MIN_TARGET = {"qk_s8_pv_f16": 80, "qk_s8_pv_s8": 80, "qk_s8_pv_e4m3": 89, "qk_s4_pv_e4m3": 89}


def _target_runs_on(target: str, major: int, minor: int) -> bool:
    """Whether the driver loads a cubin built for ``target`` ("86", "90a", "100f") on a device of
    compute capability major.minor: an 'a' cubin only on its own capability; a plain or 'f' one on
    its major at the same or a higher minor (B300 = 10.3 cannot run a 100a cubin)."""
    t_major, t_minor = divmod(int(target.rstrip("af")), 10)
    if target.endswith("a"):
        return (t_major, t_minor) == (major, minor)
    return t_major == major and t_minor <= minor


@functools.lru_cache(maxsize=None)
def arch_build_reason(recipe: str, arch: str, targets: tuple[str, ...]) -> Optional[str]:
    """None if a sage_core built for ``targets`` (build_info()["cuda_archs"]) runs ``recipe``'s
    kernel on arch family ``arch`` ("sm120"), else why not. The driver loads the highest
    compatible cubin; it must carry the recipe's MMAs (an e4m3 kernel built for 80/86 is empty)."""
    m = re.fullmatch(r"sm(\d+)(\d)", arch)
    if m is None:
        return f"device arch {arch!r} is not a CUDA compute capability"
    major, minor = int(m.group(1)), int(m.group(2))
    usable = [t for t in targets if _target_runs_on(t, major, minor)]
    loaded = max(usable, key=lambda t: int(t.rstrip("af")), default=None)
    if loaded is None:
        return (f"sage_core was built for {list(targets)}, none of which runs on {arch}: rebuild with "
                f"SAGE_CUDA_ARCHS including its target (ci/build-matrix.json arch_targets)")
    if int(loaded.rstrip("af")) < _MIN_TARGET[recipe]:
        return (f"on {arch} the driver loads sage_core's sm_{loaded} code, where {recipe} compiles to an "
                f"empty kernel (needs a target >= {_MIN_TARGET[recipe]}): rebuild with {arch}'s own target")
    return None


@functools.lru_cache(maxsize=1)
def _build_targets() -> tuple[str, ...]:
    return tuple(sage_core.build_info()["cuda_archs"]) if sage_core is not None else ()


def _make_supports(recipe: str):
    def supports(q, k, v, *, layout, is_causal, scale, return_lse, **options) -> Optional[str]:
        why = grid_limit_reason(q, layout)
        if why is None:
            # Registered for every arch the family can serve; this build may lack the device's target.
            why = arch_build_reason(recipe, _dispatch.device_arch(q.device), _build_targets())
        if why is not None:
            return why
        try:
            opts = resolve_options(recipe, options)
        except (TypeError, ValueError) as exc:
            return str(exc)
        reason = unsupported_reason(recipe, opts)
        if reason is None and opts.get("pv_accum") == "f16_buffer" and sage_core is not None:
            missing = [n for n in kernel_names(recipe, "f16_buffer") if not sage_core.has_kernel(n)]
            if missing:
                return f"sage_core was built without the pv_accum='f16_buffer' kernels {missing}"
        return reason

    return supports


def _make_available(recipe: str):
    names = kernel_names(recipe)
    fn_name = f"attn_fwd_sm80_{recipe}"

    def available() -> bool:
        if sage_core is None:
            raise RuntimeError(f"sage_core does not import: {_SAGE_CORE_ERROR}")
        return hasattr(sage_core, fn_name) and all(sage_core.has_kernel(n) for n in names)

    return available


attn_qk_s8_pv_f16 = _make_fn("qk_s8_pv_f16")
attn_qk_s8_pv_s8 = _make_fn("qk_s8_pv_s8")
attn_qk_s8_pv_e4m3 = _make_fn("qk_s8_pv_e4m3")
attn_qk_s4_pv_e4m3 = _make_fn("qk_s4_pv_e4m3")
_FNS = {"qk_s8_pv_f16": attn_qk_s8_pv_f16, "qk_s8_pv_s8": attn_qk_s8_pv_s8,
        "qk_s8_pv_e4m3": attn_qk_s8_pv_e4m3, "qk_s4_pv_e4m3": attn_qk_s4_pv_e4m3}

for _recipe in RECIPES:
    register_backend(f"sm80_{_recipe}", _recipe, archs=_ARCHS[_recipe], head_dims=HEAD_DIMS,
                     fn=_FNS[_recipe], available=_make_available(_recipe),
                     dtypes=(torch.float16, torch.bfloat16), supports=_make_supports(_recipe),
                     native_archs=tuple(a for a in _ARCHS[_recipe] if a not in _PORTED_ARCHS))
