"""A few decode calls over an INT8 KV cache (sage_torch.QuantizedKVCache, the sage_core.decode_s8
kernel) for compute-sanitizer / ncu: every row-block size (1, 4, 16 rows), one and many splits.

    compute-sanitizer --tool memcheck python tools/profile_decode.py
    compute-sanitizer --tool racecheck python tools/profile_decode.py
"""

import torch

from sage_torch import kvcache as kvc


def main() -> None:
    for d in (64, 128):
        for h_q, h_kv, s_q in ((2, 2, 1), (8, 2, 1), (16, 2, 5)):
            for length, split in ((70, 1 << 20), (333, 64)):
                kvc.split_tokens_for = lambda n, base, slots, split=split: min(split, -(-n // 64) * 64)
                cache = kvc.QuantizedKVCache(1, h_kv, d, length, device="cuda", dtype=torch.bfloat16, strict=True)
                cache.append(torch.randn(1, h_kv, length, d, device="cuda").bfloat16(),
                             torch.randn(1, h_kv, length, d, device="cuda").bfloat16())
                o = cache.attention(torch.randn(1, h_q, s_q, d, device="cuda").bfloat16())
                torch.cuda.synchronize()
                assert torch.isfinite(o).all()
    print("ok")


if __name__ == "__main__":
    main()
