"""sage_quant.testing.assert_rows_close: the per-row check catches what the aggregate misses."""

import pytest
import torch

from sage_quant.testing import assert_rows_close, row_rel_l1


def _pair(seed, shape=(2, 4, 512, 64), noise=1e-4):
    g = torch.Generator().manual_seed(seed)
    want = torch.randn(shape, generator=g, dtype=torch.float64)
    got = want + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return got, want


def test_close_tensors_pass(seed):
    got, want = _pair(seed)
    out = assert_rows_close(got, want, rel_l1=2e-3, row_rel_l1_max=2e-2, msg=f"seed={seed}")
    assert out["rel_l1"] < 2e-3 and out["row_max"] < 2e-2


@pytest.mark.parametrize("n_bad", [1, 3])
def test_a_few_wrong_rows_fail_although_the_aggregate_passes(seed, n_bad):
    got, want = _pair(seed)
    g = torch.Generator().manual_seed(seed + 1)
    rows = [(0, 1, 17), (1, 3, 200), (1, 0, 511)][:n_bad]
    for b, h, s in rows:  # a wrong row: e.g. another row's output (a wrong tile / permutation)
        got[b, h, s] = torch.randn(64, generator=g, dtype=torch.float64)
    agg = ((got - want).abs().sum() / want.abs().sum()).item()
    assert agg < 2e-3, f"the test needs an aggregate that passes, got {agg}"
    with pytest.raises(AssertionError, match=r"row\(s\) with rel-L1") as info:
        assert_rows_close(got, want, rel_l1=2e-3, row_rel_l1_max=2e-2, msg=f"seed={seed}")
    for r in rows:  # the message names the wrong rows
        assert str(r) in str(info.value)


def test_aggregate_still_checked(seed):
    got, want = _pair(seed, noise=1e-2)
    with pytest.raises(AssertionError, match="aggregate rel-L1"):
        assert_rows_close(got, want, rel_l1=2e-3, row_rel_l1_max=1.0)


def test_non_finite_rows_must_match():
    want = torch.ones(1, 2, 8, 16)
    got = want.clone()
    want[0, 1, 3, 5] = float("nan")
    got[0, 1, 3, 0] = float("nan")
    assert_rows_close(got, want, rel_l1=0, row_rel_l1_max=0)  # same NaN rows: passes
    got[0, 0, 2, 2] = float("inf")
    with pytest.raises(AssertionError, match=r"\(0, 0, 2\)"):
        assert_rows_close(got, want, rel_l1=1, row_rel_l1_max=1)


def test_small_reference_rows_use_the_floor():
    want = torch.ones(1, 1, 4, 8)
    want[0, 0, 1] = 1e-9  # a near-zero reference row: relative to the typical row, not to itself
    got = want.clone()
    got[0, 0, 1] += 1e-6
    err = row_rel_l1(got, want)
    assert err[0, 0, 1].item() < 1e-4  # 8e-6 / (0.1 * 6)
    assert_rows_close(got, want, rel_l1=1e-3, row_rel_l1_max=1e-3)


def test_all_zero_reference_needs_exact_zero():
    z = torch.zeros(1, 1, 3, 8)
    assert_rows_close(z, z, rel_l1=0, row_rel_l1_max=0)
    with pytest.raises(AssertionError, match="all zero"):
        assert_rows_close(z + 1e-3, z, rel_l1=1, row_rel_l1_max=1)
