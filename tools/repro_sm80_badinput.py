"""Step through the sm80 binding's bad-input checks one call at a time (finds a crash)."""
import faulthandler
import sys

import torch

import sage_core

faulthandler.enable()
dev = "cuda"
q = torch.zeros(1, 2, 16, 64, dtype=torch.int8, device=dev)
k = torch.zeros(1, 2, 16, 64, dtype=torch.int8, device=dev)
v = torch.zeros(1, 2, 16, 64, dtype=torch.float16, device=dev)
o = torch.full((1, 2, 16, 64), float("nan"), dtype=torch.float16, device=dev)
qs = torch.ones(1, 2, 1, device=dev)
ks = torch.ones(1, 2, 1, device=dev)
kw = dict(q_granularity="per_block", q_block=128, k_granularity="per_block", k_block=64,
          softmax_scale=0.125, is_causal=False, stream=torch.cuda.current_stream().cuda_stream)
cases = {
    "valid": lambda: sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o, None, qs, ks, **kw),
    "o d32 slice": lambda: sage_core.attn_fwd_sm80_qk_s8_pv_f16(q, k, v, o[..., :32], None, qs, ks, **kw),
    "all d32 contiguous": lambda: sage_core.attn_fwd_sm80_qk_s8_pv_f16(
        q[..., :32].contiguous(), k[..., :32].contiguous(), v[..., :32].contiguous(),
        o[..., :32].contiguous(), None, qs, ks, **kw),
    "all d32 slices": lambda: sage_core.attn_fwd_sm80_qk_s8_pv_f16(
        q[..., :32], k[..., :32], v[..., :32], o[..., :32], None, qs, ks, **kw),
}
for name, fn in cases.items():
    print("case:", name, flush=True)
    try:
        fn()
        torch.cuda.synchronize()
        print("  returned", flush=True)
    except Exception as exc:  # noqa: BLE001
        print("  raised", type(exc).__name__, str(exc)[:200], flush=True)
sys.exit(0)
