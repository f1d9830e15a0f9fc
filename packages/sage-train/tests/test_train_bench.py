"""The training benchmark's quick path (what `python -m sage_train.bench` does without a GPU)."""

import json

import pytest
import torch

from sage_train import bench


def test_flop_count():
    assert bench.fwd_bwd_flops(2, 3, 5, 7, 11, False) == 3.5 * 4 * 2 * 3 * 5 * 7 * 11
    assert bench.fwd_bwd_flops(2, 3, 5, 7, 11, True) == 3.5 * 2 * 2 * 3 * 5 * 7 * 11


def test_quick_path_writes_timing_and_gradient_accuracy(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED: SDPA flash and cuDNN backends" in out and "fwd+bwd TOPS, d=64" in out
    data = json.loads((tmp_path / "bench_train.json").read_text())
    meta, timing, acc = data["meta"], data["timing"], data["accuracy"]
    assert meta["device"] == "cpu" and len(meta["skipped"]) == 2 and "commit" in meta
    assert meta["sage_train_path"]["64"]["kind"] == "emulation"
    assert meta["tops_definition"].startswith("3.5*4*b*h*n^2*d")
    assert {(r["impl"], r["causal"]) for r in timing} == {(i, c) for i in ("sdpa_cpu", "sage_train")
                                                          for c in (False, True)}
    for r in timing:
        assert r["tops"] > 0 and r["ms"] > 0 and "error" not in r, r
        flops = bench.fwd_bwd_flops(r["b"], r["h"], r["n"], r["n"], r["d"], r["causal"])
        assert r["tops"] == pytest.approx(flops / r["ms"] / 1e9)
    assert {r["path"] for r in timing if r["impl"] == "sage_train"} == {"emulation"}
    assert {(r["impl"], r["dist"], r["causal"]) for r in acc} == {
        (i, dist, c) for i in ("sage_train", "sdpa_cpu") for dist in ("randn", "outlier") for c in (False, True)}
    for r in acc:
        for name in ("dq", "dk", "dv"):
            floor = 0.99 if r["impl"] == "sage_train" else 0.999
            assert r[f"{name}_cos"] > floor and 0 < r[f"{name}_rel_l1"] < 0.2, r
    md = (tmp_path / "bench_train.md").read_text()
    assert "gradient accuracy vs float64" in md and "skipped:" in md


def test_float64_reference_matches_autograd_of_sdpa(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(4))
    o, dq, dk, dv = bench.float64_grads(q, k, v, do, True)
    xs = [x.clone().requires_grad_() for x in (q, k, v)]
    o_t = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=True)
    grads = torch.autograd.grad(o_t, xs, do)
    torch.testing.assert_close(o, o_t.detach())
    for a, b in zip((dq, dk, dv), grads):
        torch.testing.assert_close(a, b)
