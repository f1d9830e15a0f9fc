"""Test helpers shared by the kernel tests (tests/gpu) and the CPU tests: error checks on attention
outputs per row as well as in aggregate.

An aggregate metric (rel-L1 over the whole tensor) averages a few wrong rows away: one wrong
16-row fragment in a (2, 8, 2048, 128) output moves the aggregate by 1/2048 of its error.
:func:`assert_rows_close` also bounds the worst row, where a row is one output vector (the last
dim, d) of one (batch, head, query) position, whatever the layout.
"""

from __future__ import annotations

import torch

__all__ = ["row_rel_l1", "assert_rows_close"]


def row_rel_l1(got: torch.Tensor, want: torch.Tensor, *, floor_frac: float = 0.1) -> torch.Tensor:
    """Per-row relative L1 error ``sum|got - want| / max(sum|want|, floor)`` over the last dim.

    ``floor = floor_frac * mean_rows(sum|want|)``: a row whose reference is near zero (outputs that
    average out) is measured against the typical row instead of blowing up. Rows of ``want`` that
    are not finite are returned as NaN (the caller compares their pattern). Shape: ``got.shape[:-1]``.
    """
    if got.shape != want.shape:
        raise ValueError(f"shapes differ: got {tuple(got.shape)}, want {tuple(want.shape)}")
    g = got.detach().to(torch.float64)
    w = want.detach().to(torch.float64)
    finite_ref = torch.isfinite(w).all(dim=-1)
    w_abs = w.abs().where(torch.isfinite(w), torch.zeros_like(w)).sum(dim=-1)
    typical = w_abs[finite_ref].mean() if finite_ref.any() else w_abs.new_zeros(())
    floor = torch.clamp(typical * floor_frac, min=torch.finfo(torch.float64).tiny)
    diff = (g - w).abs().sum(dim=-1)  # NaN/Inf in got -> NaN/Inf here: fails any bound
    err = diff / torch.maximum(w_abs, floor)
    return err.where(finite_ref, torch.full_like(err, float("nan")))


def _coords(i: int, shape) -> tuple:
    coords = []
    for n in reversed(shape):
        coords.append(i % n)
        i //= n
    return tuple(reversed(coords))


def _index_text(flat_idx: torch.Tensor, shape) -> str:
    return ", ".join(str(_coords(i, shape)) for i in flat_idx.tolist())


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, *, rel_l1: float, row_rel_l1_max: float,
                      msg: str = "", floor_frac: float = 0.1, worst: int = 5) -> dict:
    """Assert that ``got`` matches ``want`` in aggregate and in every row.

    * aggregate: ``sum|got - want| / sum|want| <= rel_l1`` over the rows whose reference is finite
      (exact equality when that reference is all zero);
    * per row: :func:`row_rel_l1` ``<= row_rel_l1_max`` for every such row; the message names the
      worst rows by index (``got.shape[:-1]`` coordinates) and their errors;
    * rows whose reference is not finite must not be finite in ``got`` either, and vice versa: a
      row with finite reference must be finite.

    Returns ``{"rel_l1": aggregate, "row_max": worst row error, "row_argmax": its index tuple}``.
    """
    if got.shape != want.shape:
        raise AssertionError(f"shapes differ: got {tuple(got.shape)}, want {tuple(want.shape)}: {msg}")
    g = got.detach().to(torch.float64)
    w = want.detach().to(torch.float64)
    rows_shape = tuple(got.shape[:-1])
    finite_ref = torch.isfinite(w).all(dim=-1)
    finite_got = torch.isfinite(g).all(dim=-1)
    bad_pattern = finite_ref != finite_got
    if bad_pattern.any():
        idx = bad_pattern.reshape(-1).nonzero().flatten()[:worst]
        raise AssertionError(f"{int(bad_pattern.sum())} row(s) finite in one tensor and not in the other, "
                             f"e.g. rows {_index_text(idx, rows_shape)}: {msg}")
    gf, wf = g[finite_ref], w[finite_ref]
    denom = wf.abs().sum()
    if denom == 0:
        if not torch.equal(gf, wf):
            raise AssertionError(f"reference is all zero, output is not (max |got| {gf.abs().max().item():.3e}): {msg}")
        return {"rel_l1": 0.0, "row_max": 0.0, "row_argmax": None}
    agg = ((gf - wf).abs().sum() / denom).item()
    rows = row_rel_l1(got, want, floor_frac=floor_frac)
    flat = rows.reshape(-1).where(finite_ref.reshape(-1), torch.full_like(rows.reshape(-1), -1.0))
    row_max = flat.max().item()
    arg = int(flat.argmax())
    summary = {"rel_l1": agg, "row_max": row_max, "row_argmax": _coords(arg, rows_shape)}
    if agg > rel_l1:
        raise AssertionError(f"aggregate rel-L1 {agg:.3e} > {rel_l1:.3e} (worst row {row_max:.3e} at "
                             f"{summary['row_argmax']}): {msg}")
    if row_max > row_rel_l1_max:
        over = (flat > row_rel_l1_max)
        order = flat.argsort(descending=True)[:min(worst, int(over.sum()))]
        errs = ", ".join(f"{flat[i].item():.3e}" for i in order)
        raise AssertionError(f"{int(over.sum())} row(s) with rel-L1 > {row_rel_l1_max:.3e} (aggregate {agg:.3e} "
                             f"passes): worst rows {_index_text(order, rows_shape)} errors [{errs}]: {msg}")
    return summary
