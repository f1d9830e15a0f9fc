"""One sm90 attention call (after warm-up) for ncu / compute-sanitizer to look at.

    ncu --clock-control none --set full -k regex:attn --launch-skip 2 --launch-count 1 \
        python tools/profile_sm90.py --n 8192
    compute-sanitizer --tool memcheck python tools/profile_sm90.py --n 300 --b 1 --h 2 --causal
"""

import argparse

import torch

from sage_torch.backends import sm90


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--h", type=int, default=32)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--iters", type=int, default=3)
    a = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(a.b, a.h, a.n, a.d, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    for _ in range(a.iters):
        o, _ = sm90.attention_sm90_qk_s8_pv_e4m3(q, k, v, layout="bhsd", is_causal=a.causal,
                                                 scale=a.d ** -0.5, return_lse=False)
    torch.cuda.synchronize()
    print("ok", float(o.float().abs().mean()))


if __name__ == "__main__":
    main()
