"""sage's PyTorch path keeps bottom-right causal semantics without a dense mask where it can: decode
(q_len 1: no mask at all) and q_len < kv_len (PyTorch's lower-right causal bias, fused kernels),
the dense mask only for q_len > kv_len (rows that see no key are zeroed)."""

import pytest
import torch

from sage_torch import _torch_fallback as tf


def _reference(q, k, v, scale):
    s_q, s_kv = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = q.double() @ kf.transpose(-1, -2) * scale
    allowed = tf.bottom_right_causal_mask(s_q, s_kv, q.device)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see no key: 0
    return p @ vf


@pytest.mark.parametrize("s_q,s_kv", [(1, 9), (3, 9), (9, 9), (12, 9)])
def test_bottom_right_causal_paths(s_q, s_kv, monkeypatch, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, s_q, 64, generator=g)
    k = torch.randn(2, 2, s_kv, 64, generator=g)
    v = torch.randn(2, 2, s_kv, 64, generator=g)
    masks = []
    real = tf.TORCH_SDPA

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return real(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(tf, "TORCH_SDPA", spy)
    o, _ = tf.torch_attention(q, k, v, layout="bhsd", is_causal=True, scale=0.125, return_lse=False)
    torch.testing.assert_close(o.double(), _reference(q, k, v, 0.125), atol=1e-5, rtol=0)
    (mask,) = masks
    if s_q == 1 or s_q == s_kv:
        assert mask is None
    elif s_q < s_kv:
        from torch.nn.attention.bias import CausalBias

        assert isinstance(mask, CausalBias)
    else:
        assert type(mask) is torch.Tensor and mask.dtype == torch.bool
