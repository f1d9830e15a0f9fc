"""diffusers: sage as an attention backend of diffusers' dispatcher, plus a classic processor.

**The backend (recommended).** Most diffusers transformers (Flux, Wan, SD3, HunyuanVideo, ...)
compute attention through ``diffusers.models.attention_dispatch.dispatch_attention_fn``, whose
backend is chosen by ``model.set_attention_backend(name)``. diffusers' own ``"sage"`` backend
wants the SageAttention package; :func:`register_diffusers` adds ours::

    sage_torch.register_diffusers()                   # -> "sage_torch"
    transformer.set_attention_backend("sage_torch")
    # or: with diffusers.attention_backend("sage_torch"): pipe(...)

diffusers' registry accepts only members of its ``AttentionBackendName`` enum (``set_attention_backend``
checks ``AttentionBackendName.__members__``) and has no API for adding one, so
:func:`register_diffusers` adds the member ``SAGE_TORCH = "sage_torch"`` to that enum and
registers :func:`diffusers_attention_backend` for it through
``_AttentionBackendRegistry.register``, the decorator diffusers uses for its own backends.
Nothing else of diffusers is changed; the other backends keep working.

The backend runs every call sage can run (no mask, no dropout, CUDA fp16/bf16, head dim 64/128,
causal only with q_len == kv_len) on sage, in diffusers' ``(batch, seq, heads, head_dim)``
layout without copies; every other call goes to PyTorch's SDPA with a warning once per reason
(``SAGE_STRICT=1``: an error), exactly like :func:`sage_torch.scaled_dot_product_attention`.
Context parallelism and ``return_lse`` are refused (ValueError).

**The processor.** :class:`SageAttnProcessor` is the classic self-/cross-attention processor
(the dataflow of diffusers' ``AttnProcessor2_0``) for ``diffusers.models.attention_processor.Attention``
modules, e.g. the UNets. It refuses (TypeError, naming the module) what that processor cannot
express: modules without ``to_out`` (Flux single blocks), joint attention (``add_q_proj``: Flux,
SD3), and extra arguments such as ``image_rotary_emb``: use the backend for those models.

diffusers is imported only inside :func:`register_diffusers`; the processor uses only the
module it is given.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import api

DIFFUSERS_BACKEND_NAME = "sage_torch"
_MEMBER_NAME = "SAGE_TORCH"


def diffusers_attention_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
                                return_lse: bool = False, _parallel_config: Any = None) -> torch.Tensor:
    """diffusers attention backend: ``(b, s, h, d)`` in, ``(b, s_q, h_q, d)`` out (diffusers' layout).

    Same semantics as diffusers' ``"native"`` backend (PyTorch SDPA on the permuted tensors,
    2-D ``(b, s_kv)`` masks broadcast over heads and queries).
    """
    if _parallel_config is not None:
        raise ValueError("the sage_torch diffusers backend does not support context parallelism; use the "
                         "'native' backend with a parallel config")
    if return_lse:
        raise ValueError("the sage_torch diffusers backend does not return the LSE (return_lse=True)")
    if (isinstance(attn_mask, torch.Tensor) and attn_mask.dim() == 2 and attn_mask.shape[0] == query.shape[0]
            and attn_mask.shape[1] == key.shape[1]):
        attn_mask = attn_mask[:, None, None, :]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)):
        raise ValueError("the sage_torch diffusers backend takes 4-D (batch, seq, heads, head_dim) tensors")
    q, k, v = (t.permute(0, 2, 1, 3) for t in (query, key, value))  # views in (b, h, s, d)
    why, _ = api._sdpa_fallback_reason(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if why is None:  # sage runs it, in diffusers' own layout: no copies in or out
        return api.attention(query, key, value, layout="bshd", is_causal=bool(is_causal), scale=scale)
    out = api.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                           scale=scale, enable_gqa=enable_gqa)  # warns once / strict raises
    return out.permute(0, 2, 1, 3)


def _backend_member(enum_cls):
    """``enum_cls.SAGE_TORCH``, added to diffusers' ``AttentionBackendName`` if it is not there."""
    existing = enum_cls._value2member_map_.get(DIFFUSERS_BACKEND_NAME)
    if existing is not None:
        return existing
    if _MEMBER_NAME in enum_cls.__members__:
        raise RuntimeError(f"diffusers' AttentionBackendName already has a member {_MEMBER_NAME} with value "
                           f"{enum_cls[_MEMBER_NAME].value!r}; cannot register {DIFFUSERS_BACKEND_NAME!r}")
    member = str.__new__(enum_cls, DIFFUSERS_BACKEND_NAME)  # AttentionBackendName is (str, Enum)
    member._name_ = _MEMBER_NAME
    member._value_ = DIFFUSERS_BACKEND_NAME
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13 has the private helper
    if add_member is not None:
        add_member(_MEMBER_NAME, member)
    else:
        type.__setattr__(enum_cls, _MEMBER_NAME, member)
        enum_cls._member_map_[_MEMBER_NAME] = member
        enum_cls._member_names_.append(_MEMBER_NAME)
    enum_cls._value2member_map_[DIFFUSERS_BACKEND_NAME] = member
    return member


def register_diffusers() -> str:
    """Register :func:`diffusers_attention_backend` with diffusers' attention dispatcher as
    ``"sage_torch"`` (idempotent); returns the name for ``model.set_attention_backend``."""
    try:
        from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    except ImportError as exc:
        raise ImportError(f"register_diffusers needs diffusers with models.attention_dispatch (>= 0.35): "
                          f"{exc}") from exc
    member = _backend_member(AttentionBackendName)
    if _AttentionBackendRegistry._backends.get(member) is not diffusers_attention_backend:
        _AttentionBackendRegistry.register(member, constraints=[])(diffusers_attention_backend)
    return DIFFUSERS_BACKEND_NAME


class SageAttnProcessor:
    """The classic processor (diffusers' ``AttnProcessor2_0`` dataflow) for ``Attention``
    modules, with :func:`sage_torch.scaled_dot_product_attention` for the attention itself (so
    masks and dropout fall back to PyTorch's SDPA, never a silently different result).

    Use ``unet.set_attn_processor(SageAttnProcessor())``. Models whose attention needs its own
    processor (rotary embeddings, joint text/image attention, pre-only blocks: Flux, SD3, Wan, ...)
    are refused with a TypeError: use ``set_attention_backend("sage_torch")`` for them.
    """

    @staticmethod
    def _refuse(attn, what: str) -> None:
        raise TypeError(f"SageAttnProcessor handles classic self-/cross-attention only; {type(attn).__name__} "
                        f"{what}. For such models call sage_torch.register_diffusers() and "
                        f"model.set_attention_backend('sage_torch') (keeps the model's own processor), or "
                        f"wrap the call in sage_torch.patch_sdpa()")

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        extra = [f"positional argument #{i + 6}" for i, a in enumerate(args) if a is not None]
        extra += [f"{name}=" for name, val in kwargs.items() if val is not None and name != "scale"]
        if extra:
            self._refuse(attn, f"was called with {', '.join(extra)} (e.g. rotary embeddings), which this "
                               f"processor would drop")
        if getattr(attn, "to_out", None) is None:
            self._refuse(attn, "has no output projection (to_out): a pre-only block with its own processor")
        if getattr(attn, "add_q_proj", None) is not None or getattr(attn, "add_k_proj", None) is not None:
            self._refuse(attn, "is joint attention (add_q_proj/add_k_proj)")
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # (b, c, h, w) -> (b, h*w, c)
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, seq_len, _ = (hidden_states.shape if encoder_hidden_states is None
                             else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif getattr(attn, "norm_cross", None):
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)

        hidden_states = api.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                         dropout_p=0.0, is_causal=False,
                                                         scale=getattr(attn, "scale", None))
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if getattr(attn, "residual_connection", False):
            hidden_states = hidden_states + residual
        return hidden_states / getattr(attn, "rescale_output_factor", 1.0)
