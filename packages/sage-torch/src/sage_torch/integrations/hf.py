"""Hugging Face transformers: sage as an attention implementation (``attn_implementation="sage"``).

transformers is imported only inside :func:`register_hf` and on the fallback paths.

What the attention function does with each argument a transformers model passes to it
(compare ``transformers.integrations.sdpa_attention.sdpa_attention_forward``):

==========================  ==================================================================
argument                    handling
==========================  ==================================================================
query / key / value         ``(b, h, s, d)``; GQA/MQA (fewer kv heads) run natively
attention_mask              4-D bool/float mask built by transformers' *sdpa* mask function
                            (:func:`register_hf` registers it for our name): ``None`` for
                            plain causal/full attention -> sage; a boolean mask that is only
                            padding (+ causal) -> unpad, :func:`sage_torch.attention_varlen`,
                            pad (``integrations/padding.py``; padding rows give 0); any
                            other mask (sliding window, packing, additive) -> PyTorch's SDPA
                            with that mask, exact, warned once by the SDPA drop-in
dropout                     > 0 -> PyTorch's SDPA (sage has no dropout), warned once
scaling                     the softmax scale
is_causal                   as SDPA: causal when the module is causal, there is no mask and
                            q_len > 1; a prefill into a longer empty static cache is cut to
                            q_len keys exactly like SDPA does
sliding_window              already encoded in the sdpa mask (as for SDPA): ignored
flash-attention metadata    ``cu_seq_lens_*``, ``max_length_*``, ``position_ids``, ``seq_idx``
                            ... describe packing that the sdpa mask already encodes: ignored
position_bias (T5 family)   additive relative-position bias: transformers' own SDPA function
                            runs the call (bias folded into the mask), warned once
softcap (Gemma2 family)     logit soft-capping, which SDPA cannot express (transformers' SDPA
                            drops it): the model's own eager attention runs, warned once
s_aux (GPT-OSS sinks)       attention-sink logits: the model's eager attention, warned once
any other non-None kwarg    unknown meaning: the model's eager attention, warned once
model without SDPA support  a model class with ``_supports_sdpa = False``: the model's eager
                            attention, warned once
output_attentions=True      ValueError (sage never materialises the weights)
key from a SageKVCache      (``integrations/hf_kvcache.py``: an INT8 KV cache for generate) the
                            decode kernel over the cache (``QuantizedKVCache.attention``); with
                            a mask, dropout or other kwargs: the cache dequantized, warned once
==========================  ==================================================================

Strict mode (``SAGE_STRICT=1``) turns every one of these fallbacks into a
:class:`sage_torch.SageDispatchError`.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .. import _dispatch, api
from . import padding

HF_ATTENTION_NAME = "sage"

#: kwargs transformers passes that do not change the result of SDPA-style attention (their
#: information is already in the sdpa-format mask, or they only steer other implementations).
HF_IGNORED_KWARGS: frozenset[str] = frozenset({
    "sliding_window", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids",
    "seq_idx", "deterministic", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "cache_position", "use_cache", "past_key_values", "past_key_value", "return_dict", "output_attentions",
    "layer_idx", "query_length", "key_length", "use_top_left_mask",
})

#: kwargs sage cannot honour, with the model feature they stand for (shown in the warning).
HF_UNSUPPORTED_KWARGS: dict[str, str] = {
    "position_bias": "additive relative position bias (T5 family)",
    "softcap": "attention logit soft-capping (Gemma2 family)",
    "s_aux": "attention sinks (GPT-OSS family)",
    "indices": "sparse top-k attention indices (DeepSeek sparse attention)",
    "block_indices": "block-sparse attention indices",
}


def _strict() -> bool:
    return _dispatch._resolve_flags(None, None)[1]


def _fallback_notice(key: str, message: str) -> None:
    if _strict():
        raise _dispatch.SageDispatchError(f"sage_torch strict mode: {message}; not falling back")
    if not torch.compiler.is_compiling():
        _dispatch.warn_once(f"hf:{key}", f"sage_torch (transformers attn_implementation='sage'): {message}.",
                            stacklevel=5)


_SDPA_SUPPORT: dict[type, tuple[bool, str]] = {}


def _model_sdpa_support(module: torch.nn.Module) -> tuple[bool, str]:
    """(does the model this attention module belongs to declare SDPA support, its class name).

    transformers checks ``_supports_sdpa`` only for "sdpa" itself, so a custom implementation is
    accepted for any model. The attention module does not know its model: look at the
    ``PreTrainedModel`` classes of the module's own modeling file (narrowed to those whose
    ``config_class`` matches the module's config when it has one). Unknown -> supported.
    """
    cls = type(module)
    if cls in _SDPA_SUPPORT:
        return _SDPA_SUPPORT[cls]
    result = (True, "")
    try:
        from transformers import PreTrainedModel
    except ImportError:  # called outside transformers: nothing to check
        return result
    mod = sys.modules.get(cls.__module__)
    if mod is not None:
        models = [obj for obj in vars(mod).values() if isinstance(obj, type) and issubclass(obj, PreTrainedModel)
                  and obj is not PreTrainedModel and obj.__module__ == mod.__name__]
        config = getattr(module, "config", None)
        if config is not None:
            same = [m for m in models if getattr(m, "config_class", None) is type(config)]
            models = same or models
        if models and not all(bool(getattr(m, "_supports_sdpa", True)) for m in models):
            names = sorted(m.__name__ for m in models if not getattr(m, "_supports_sdpa", True))
            result = (False, names[0])
    _SDPA_SUPPORT[cls] = result
    return result


def _eager_of(module: torch.nn.Module) -> Callable | None:
    """The model's own ``eager_attention_forward`` (its modeling file defines it, with every
    feature of that model: soft-capping, sinks, ...)."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "eager_attention_forward", None) if mod is not None else None
    return fn if callable(fn) else None


def _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, why: str):
    eager = _eager_of(module)
    if eager is None:
        raise NotImplementedError(f"attn_implementation='sage' cannot run {type(module).__name__}: {why}, and its "
                                  f"modeling file has no eager_attention_forward to fall back to; load the model "
                                  f"with attn_implementation='eager'")
    _fallback_notice(f"eager:{type(module).__name__}:{why}",
                     f"{type(module).__name__} uses {why}, which sage cannot honour: running the model's eager "
                     f"attention instead")
    call_kwargs = dict(kwargs)
    if is_causal is not None:
        call_kwargs["is_causal"] = is_causal
    mask = _eager_mask(module, query, key, attention_mask, is_causal)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **call_kwargs)


def _eager_mask(module, query, key, attention_mask, is_causal):
    """The sdpa-format mask we registered, in the additive form eager attention adds to the logits.

    The sdpa mask function returns ``None`` where SDPA's ``is_causal`` suffices (no padding,
    q_len == kv_len or q_len == 1) and boolean masks (True = attend) elsewhere; eager attention
    needs the causal part spelled out and adds the mask, so both are converted here.
    """
    dtype = query.dtype
    if attention_mask is None:
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        q_len, kv_len = query.shape[2], key.shape[2]
        if not causal or q_len == 1:
            return None
        rows = torch.arange(q_len, device=query.device)[:, None]
        cols = torch.arange(kv_len, device=query.device)[None, :]
        attention_mask = (cols <= rows)[None, None]  # SDPA's is_causal: top-left aligned
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
        attention_mask = torch.where(attention_mask, zero, low)
    return attention_mask


def _padded_batch_runs_on_sage(query, key, value, dropout, scaling) -> bool:
    """Whether a padded batch may take the varlen route: sage would run this call without its mask
    on a kernel or the emulation (CUDA, fp16/bf16, supported head dim, no dropout, no grad, and not
    a shape ``recipe="auto"`` sends to PyTorch's SDPA anyway, e.g. decode: one SDPA call with the
    mask beats one per sequence) and we are not being traced (reading the mask is a host sync)."""
    if torch.compiler.is_compiling():
        return False
    why, _ = api._sdpa_fallback_reason(query, key, value, None, dropout, False, scaling,
                                       query.shape[1] != key.shape[1])
    if why is not None:
        return False
    call = {"q": query, "k": key, "v": value,
            "kwargs": {"layout": "bhsd", "is_causal": False, "scale": scaling, "return_lse": False}}
    try:
        decision = _dispatch.resolve(_dispatch.device_arch(query.device), query.dtype, query.shape[-1], "auto",
                                     strict=False, call=call)
    except (ValueError, TypeError):  # e.g. a bad SAGE_FORCE_RECIPE: the SDPA path reports it
        return False
    return decision.kind in (_dispatch.KIND_KERNEL, _dispatch.KIND_EMULATION)


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0,
                         scaling: float | None = None, is_causal: bool | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function.

    query ``(b, h_q, s_q, d)``, key/value ``(b, h_kv, s_kv, d)`` (transformers' convention);
    returns ``(out (b, s_q, h_q, d), None)``. Same results as transformers' ``sdpa`` for every
    call it accepts (in a padded batch: at every real token; padding rows give 0); what sage cannot
    honour falls back loudly (module docstring).
    """
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='sage' cannot return attention weights "
                         "(output_attentions=True); use attn_implementation='eager'")
    kv_cache = getattr(key, "_sage_kv_cache", None)  # a SageKVCache layer's INT8 cache (hf_kvcache.py)
    if kv_cache is not None:
        return _attend_kv_cache(module, query, kv_cache, attention_mask, dropout, scaling, is_causal, kwargs)
    supported, model_name = _model_sdpa_support(module)
    if not supported:
        return _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs,
                          f"a model class that declares no SDPA support ({model_name}._supports_sdpa = False)")
    unknown = []
    for name, val in kwargs.items():
        if val is None or name in HF_IGNORED_KWARGS or name == "position_bias":
            continue
        unknown.append(name)
    if unknown:
        features = ", ".join(f"{n}= ({HF_UNSUPPORTED_KWARGS[n]})" if n in HF_UNSUPPORTED_KWARGS
                             else f"{n}= (an argument sage does not know)" for n in sorted(unknown))
        return _run_eager(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs, features)
    if kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _fallback_notice(f"position_bias:{type(module).__name__}",
                         f"{type(module).__name__} passes position_bias= ({HF_UNSUPPORTED_KWARGS['position_bias']}), "
                         f"which sage cannot apply: running transformers' SDPA attention instead")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)

    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal_arg = is_causal
    if is_causal is None:
        is_causal = bool(getattr(module, "is_causal", True))
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    routed = _dispatch.auto_torch_route(query, key, value, "bhsd", is_causal)
    if routed is not None:
        # A shape recipe="auto" gives to PyTorch (AUTO_TORCH_RULES): transformers' own SDPA
        # attention, so the call runs exactly as with attn_implementation="sdpa" (its GQA
        # handling, its mask, its backend choice), not through sage's PyTorch path.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        _dispatch._warn_torch(routed, {})
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal_arg, **kwargs)
    if attention_mask is not None and _padded_batch_runs_on_sage(query, key, value, dropout, scaling):
        plan = padding.cached_padding_plan(attention_mask, q_len, kv_len)
        if plan is not None:
            return padding.run_padded(plan, query, key, value, scale=scaling), None
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :kv_len]
    if is_causal and kv_len > q_len:
        # transformers' SDPA: only a prefill into an empty static cache gets here; SDPA's causal
        # mask is top-left aligned, so the keys past q_len are never seen: drop them.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = api.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                           is_causal=is_causal, scale=scaling,
                                           enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _attend_kv_cache(module, query, kv_cache, attention_mask, dropout, scaling, is_causal, kwargs):
    """Attention over a SageKVCache layer's INT8 cache: the decode kernel when the call is plain
    (no mask, no dropout, nothing the kernel cannot apply), else the cache dequantized through the
    usual path (warned once; strict: an error)."""
    extra = sorted(n for n, v in kwargs.items() if v is not None and n not in HF_IGNORED_KWARGS)
    why = None
    if attention_mask is not None:
        why = "an attention mask (padding) is given"
    elif dropout:
        why = f"dropout={dropout}"
    elif extra:
        why = f"arguments the decode kernel cannot apply ({', '.join(extra)})"
    if why is None:
        causal = bool(getattr(module, "is_causal", True)) if is_causal is None else bool(is_causal)
        o = kv_cache.attention(query, is_causal=causal, scale=scaling)
        return o.transpose(1, 2).contiguous(), None
    _fallback_notice(f"kvcache:{why}", f"SageKVCache: {why}; dequantizing the INT8 cache for this call "
                     f"(slower than a bf16 cache)")
    k, v = kv_cache.dequantize()
    return hf_attention_forward(module, query, k, v, attention_mask, dropout, scaling, is_causal, **kwargs)


def register_hf(name: str = HF_ATTENTION_NAME) -> str:
    """Register :func:`hf_attention_forward` with transformers under ``name``; returns ``name``.

    Then ``AutoModel.from_pretrained(..., attn_implementation="sage")`` (or
    ``model.set_attn_implementation("sage")``). The mask function registered for ``name`` is
    transformers' sdpa mask (``AttentionMaskInterface``), so padded batches, sliding windows and
    packed sequences get the same masks as with ``"sdpa"``; without it transformers would build
    no mask at all for an unknown name.
    """
    try:
        from transformers import AttentionInterface
    except ImportError as exc:
        raise ImportError(f"register_hf needs transformers with AttentionInterface (>= 4.48): {exc}") from exc
    AttentionInterface.register(name, hf_attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        # transformers < 4.53 has no mask registry: its models build the (always materialised)
        # 4-D mask themselves, which the attention function receives and honours.
        return name
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return name
