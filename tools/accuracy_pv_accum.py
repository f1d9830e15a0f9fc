"""pv_accum="one_level" vs "two_level" of qk_s8_pv_e4m3 against float64, by sequence length.

The accuracy side of the one-level option (issue 8: a numerics change is a recipe option with its
accuracy measured at n = 2k, 8k, 32k). Emulation (``sage_quant.emulate``, the kernels' oracle),
b=1, h=2, d=128, bf16, non-causal, seed 0, rel-L1 vs ``sage_quant.reference_attention`` (float64).

    python tools/accuracy_pv_accum.py [--n 2048 8192 32768] [--out results.json]

32k needs a float64 reference of 2 x 32k x 32k scores per head pair (chunked inside
``reference_attention``) and minutes of CPU; on a GPU pass ``--device cuda``.
"""

import argparse
import json

import torch

import sage_quant as sq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for n in args.n:
        for dist in ("outlier", "randn"):
            q, k, v = sq.make_qkv(dist, b=1, h_q=2, h_kv=2, s_q=n, s_kv=n, d=128, dtype=torch.bfloat16,
                                  layout="bhsd", seed=0, device=args.device)
            ref = sq.reference_attention(q, k, v, is_causal=False)
            row = {"n": n, "dist": dist}
            for smooth_v in (True, False):
                for accum in ("two_level", "one_level"):
                    o = sq.emulate(q, k, v, "qk_s8_pv_e4m3", smooth_v=smooth_v, pv_accum=accum)
                    row[f"{'smooth_v' if smooth_v else 'plain_v'}+{accum}"] = round(sq.accuracy(o, ref)["rel_l1"], 5)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
