"""The real-training check's CPU path (`python -m sage_train.train_check --quick`): data from the
installed packages' descriptions, two same-seed runs, the sage run routed through sage_train."""

import json

import pytest

from sage_train import _function, train_check


def test_corpus_is_the_installed_descriptions_in_a_fixed_order():
    a, meta = train_check.corpus_bytes()
    b, _ = train_check.corpus_bytes()
    assert a == b and meta["bytes"] == len(a) >= train_check.MIN_CORPUS_BYTES and meta["distributions"] > 0


def test_batches_are_the_same_for_both_runs():
    s1 = train_check.batch_starts(10_000, 64, 4, 3, seed=0)
    s2 = train_check.batch_starts(10_000, 64, 4, 3, seed=0)
    assert s1.equal(s2) and s1.shape == (3, 4) and int(s1.max()) < 10_000 - 65


def test_quick_run_writes_curves_and_routes_the_sage_run(tmp_path, monkeypatch):
    calls = []
    real = _function.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal"))
        return real(*args, **kwargs)

    monkeypatch.setattr(_function, "attention", spy)
    with pytest.warns(Warning):  # the emulation says once that it runs (no kernel on the CPU)
        assert train_check.main(["--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "train_check.json").read_text())
    runs = {r["run"]: r for r in res["runs"]}
    q = train_check.QUICK
    assert set(runs) == {"sdpa", "sage"} and all(r["steps_done"] == q["steps"] for r in runs.values())
    # the sage run's model: one causal attention call per layer per training step and per held-out
    # batch, all through sage_train (the sdpa run's never reach it)
    n_eval = len(runs["sage"]["eval"]) * q["eval_batches"]
    assert len(calls) == q["layers"] * (q["steps"] + n_eval) and all(calls)
    # same seed, same batches: the first step's losses agree to the quantization error
    first = [runs[n]["train_loss"][0] for n in ("sdpa", "sage")]
    assert abs(first[0] - first[1]) / first[0] < 1e-2
    assert res["meta"]["quick"] and "emulation" in res["meta"]["sage_ran"]
    assert "held-out loss, sage vs sdpa" in (tmp_path / "train_check.md").read_text()
