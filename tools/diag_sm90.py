"""Localize errors of the sm90 qk_s8_pv_e4m3 kernel (GPU): where in rows/channels/tiles they sit.

    python tools/diag_sm90.py
"""

import torch

import sage_quant
from sage_quant import metrics
from sage_quant import reference as R
from sage_torch.backends import sm90


def dequant_ref(qz, q_shape, scale, is_causal):
    """float64 attention from the kernel's own quantized tensors (no P quantization)."""
    b, h, s_q, d = q_shape
    s_kv = qz["k"].shape[2]
    qd = R.dequant_int(qz["q"], qz["q_scale"], bits=8, granularity="per_thread", role="q", seq_len=s_q).double()
    kd = R.dequant_int(qz["k"], qz["k_scale"], bits=8, granularity="per_thread", role="k", block=128,
                       seq_len=s_kv).double()
    vt = sm90.unpermute_v_e4m3_t(qz["v_t"])[..., :s_kv]
    vd = R.e4m3_to_float(vt).double().transpose(-1, -2) * qz["v_scale"].double()[:, :, None, :]
    rep = h // kd.shape[1]
    kd, vd = kd.repeat_interleave(rep, 1), vd.repeat_interleave(rep, 1)
    s = qd @ kd.transpose(-1, -2) * scale
    if is_causal:
        i = torch.arange(s_q, device=s.device)[:, None]
        j = torch.arange(s_kv, device=s.device)[None, :]
        s = s.masked_fill(j > i + s_kv - s_q, float("-inf"))
    o = torch.softmax(s, -1) @ vd
    if qz.get("v_mean") is not None:  # V smoothing: softmax rows sum to 1, the mean comes back whole
        o = o + qz["v_mean"].double().repeat_interleave(rep, 1)[:, :, None, :]
    return o


def profile(name, err, n):
    v = [float(err[i::n].mean()) for i in range(n)]
    print(f"  {name}: " + " ".join(f"{x:.3f}" for x in v))


def main():
    torch.manual_seed(0)
    for (s_q, s_kv, d, causal) in [(64, 128, 128, False), (128, 128, 128, False), (128, 256, 128, False),
                                   (256, 1024, 128, False), (128, 128, 64, False), (256, 256, 128, True)]:
        q, k, v = (torch.randn(1, 1, s, d, device="cuda", dtype=torch.float16) for s in (s_q, s_kv, s_kv))
        scale = d ** -0.5
        qz = sm90.quantize_qkv_sm90(q, k, v)
        q_ref, qs_ref = R.quant_int(q, bits=8, granularity="per_thread", role="q")
        k_ref, ks_ref = R.quant_int(k, bits=8, granularity="per_thread", role="k", block=128, mean=qz["k_mean"])
        print(f"== s_q={s_q} s_kv={s_kv} d={d} causal={causal}: quant diffs q {int((qz['q'] != q_ref).sum())} "
              f"qs {float((qz['q_scale'] - qs_ref).abs().max()):.2e} k {int((qz['k'] != k_ref).sum())} "
              f"ks {float((qz['k_scale'] - ks_ref).abs().max()):.2e}")
        o, _ = sm90.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout="bhsd", is_causal=causal, scale=scale,
                                                 return_lse=False)
        ref = dequant_ref(qz, q.shape, scale, causal)
        emu = sage_quant.emulate(q, k, v, "qk_s8_pv_e4m3", is_causal=causal)
        print("  kernel vs dequant-f64:", {k_: round(v_, 5) for k_, v_ in metrics.accuracy(o, ref).items()})
        print("  emul   vs dequant-f64:", {k_: round(v_, 5) for k_, v_ in metrics.accuracy(emu, ref).items()})
        err = (o.double() - ref).abs()[0, 0]  # (s_q, d)
        profile("row%16", err.mean(1), 16)
        profile("row//16 (first 8)", torch.stack([err[i * 16:(i + 1) * 16].mean() for i in range(min(8, s_q // 16))]), 1) \
            if s_q >= 16 else None
        print("  per 16-row block:", " ".join(f"{float(err[i:i + 16].mean()):.3f}" for i in range(0, s_q, 16)))
        print("  per 8-channel block:", " ".join(f"{float(err[:, c:c + 8].mean()):.3f}" for c in range(0, d, 8)))
        # row/column permutation detector
        on = torch.nn.functional.normalize(o[0, 0].double(), dim=1)
        rn = torch.nn.functional.normalize(ref[0, 0], dim=1)
        best = (on @ rn.T).argmax(1)
        print("  best-matching ref row for kernel rows 0..15:", best[:16].tolist())
        oc = torch.nn.functional.normalize(o[0, 0].double().T, dim=1)
        rc = torch.nn.functional.normalize(ref[0, 0].T, dim=1)
        print("  best-matching ref channel for kernel channels 0..15:", (oc @ rc.T).argmax(1)[:16].tolist())
        print("  o[0,:8] ", [round(float(x), 3) for x in o[0, 0, 0, :8]])
        print("  ref[0,:8]", [round(float(x), 3) for x in ref[0, 0, 0, :8]])


if __name__ == "__main__":
    main()
