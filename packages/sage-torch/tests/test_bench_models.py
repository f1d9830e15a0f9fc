"""CPU tests of the model-level benchmark (``python -m sage_torch.bench --models --quick``).

The quick models run on the CPU (``--device cpu``, also on a GPU machine) with sage's attention as
the CPU emulation of the sm90 default recipe; spies check that the sage variant really went
through sage (the SDPA drop-in / the transformers attention function, then the emulation) and
that the comparison rows and JSON fields are there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

import sage_quant
from sage_torch import api, bench, bench_models
from sage_torch._torch_fallback import TORCH_SDPA

META_KEYS = ("device", "torch", "commit", "command", "timestamp", "timing", "configs", "libraries", "sage_info")


@pytest.fixture
def spies(monkeypatch):
    """Counts calls of sage_torch.attention (what the drop-in hands to sage) and of the emulation."""
    calls = {"attention": [], "emulate": []}
    real_attention, real_emulate = api.attention, sage_quant.emulate

    def attention(q, k, v, **kwargs):
        calls["attention"].append((tuple(q.shape), tuple(k.shape), bool(kwargs.get("is_causal"))))
        return real_attention(q, k, v, **kwargs)

    def emulate(q, k, v, recipe, **kwargs):
        calls["emulate"].append(recipe)
        return real_emulate(q, k, v, recipe, **kwargs)

    monkeypatch.setattr(api, "attention", attention)
    monkeypatch.setattr(sage_quant, "emulate", emulate)
    return calls


def _rows(result, model, tokens):
    return {r["variant"]: r for r in result["rows"] if r.get("model") == model and r.get("tokens") == tokens}


def _check_meta(result, out_dir):
    for key in META_KEYS:
        assert key in result["meta"], key
    assert result["meta"]["device"] == "cpu" and result["meta"]["torch"] == torch.__version__
    assert result["meta"]["timing"].startswith("skipped")
    assert "--quick" in result["meta"]["command"]
    assert (out_dir / "models.md").read_text().startswith("device cpu")


def _check_sage_row(row, calls_expected, causal):
    assert row["sage_attention_calls"] == calls_expected == row["attention_calls_expected"]
    (sig,) = row["sage_signatures"].values()
    assert sig["calls"] == calls_expected
    assert sig["decision"]["kind"] == "emulation" and sig["decision"]["recipe"] == "qk_s8_pv_e4m3"
    assert row["sage_ran"] == f"emulation qk_s8_pv_e4m3 x{calls_expected}"
    assert all(f"causal={causal}" in key for key in row["sage_signatures"])


def test_quick_dit_cpu_goes_through_patch_sdpa(tmp_path, spies, capsys):
    argv = ["--models", "--quick", "--device", "cpu", "--models", "dit", "--tokens", "64", "--out", str(tmp_path)]
    assert bench.main(argv) == 0  # through the attention benchmark's --models switch
    assert "timing benchmark is SKIPPED" in capsys.readouterr().out
    cfg = bench_models.DIT_QUICK
    d = cfg["width"] // cfg["heads"]
    # every block's attention reached sage (packed-qkv strided views, non-causal) and was emulated
    assert spies["attention"] == [((1, cfg["heads"], 64, d), (1, cfg["heads"], 64, d), False)] * cfg["blocks"]
    assert spies["emulate"] == ["qk_s8_pv_e4m3"] * cfg["blocks"]
    # everything the run patched is back
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert api.SDPA_DEVICE_TYPES == ("cuda",)
    assert "SAGE_FORCE_RECIPE" not in os.environ and "SAGE_FORCE_EMULATION" not in os.environ

    result = json.loads((tmp_path / "models.json").read_text())
    _check_meta(result, tmp_path)
    rows = _rows(result, "dit", 64)
    assert list(rows) == list(bench_models.DIT_VARIANTS)
    assert rows["sdpa_cudnn"]["skipped"].startswith("the cuDNN SDPA backend needs")
    _check_sage_row(rows["sage"], cfg["blocks"], causal=False)
    sage_rel = rows["sage"]["vs_sdpa"]["hidden"]["rel_l1"]
    assert 0 < sage_rel < 0.05  # quantized: not PyTorch's result, but close to it
    for ref in ("math", "float32"):
        assert 0 <= rows[ref]["vs_sdpa"]["hidden"]["rel_l1"] < 0.02
        assert rows[ref]["vs_sdpa"]["hidden"]["cos"] > 0.999
    assert "vs_sdpa" not in rows["no_attention"] and "ms" not in rows["sdpa"]
    md = (tmp_path / "models.md").read_text()
    assert "### dit" in md and "emulation qk_s8_pv_e4m3 x" in md


def test_quick_llama_cpu_goes_through_the_hf_integration(tmp_path, spies, monkeypatch):
    pytest.importorskip("transformers", reason="transformers is not installed: the Llama model needs it")
    from sage_torch.integrations import hf

    seen = []
    real = hf.hf_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append(tuple(query.shape))
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(hf, "hf_attention_forward", spy)  # register_hf() registers what this names
    argv = ["--quick", "--device", "cpu", "--models", "llama", "--tokens", "48", "--out", str(tmp_path)]
    assert bench_models.main(argv) == 0
    cfg = bench_models.LLAMA_QUICK
    assert seen == [(1, cfg["heads"], 48, cfg["head_dim"])] * cfg["layers"], seen
    gqa = ((1, cfg["heads"], 48, cfg["head_dim"]), (1, cfg["kv_heads"], 48, cfg["head_dim"]), True)
    assert spies["attention"] == [gqa] * cfg["layers"]
    assert spies["emulate"] == ["qk_s8_pv_e4m3"] * cfg["layers"]

    result = json.loads((tmp_path / "models.json").read_text())
    _check_meta(result, tmp_path)
    assert result["meta"]["libraries"]["transformers"] != "not installed"
    rows = _rows(result, "llama", 48)
    assert list(rows) == list(bench_models.LLAMA_VARIANTS)
    _check_sage_row(rows["sage"], cfg["layers"], causal=True)
    for key in ("logits", "hidden"):
        assert 0 < rows["sage"]["vs_sdpa"][key]["rel_l1"] < 0.1
        assert 0 <= rows["eager"]["vs_sdpa"][key]["rel_l1"] < 0.05
    assert "### llama" in (tmp_path / "models.md").read_text()


def _args(**kw):
    base = dict(warmup=0, iters=1, min_time=0.0, max_iters=200, dense_max_tokens=16384)
    return argparse.Namespace(**{**base, **kw})


def _fake_clock(monkeypatch, ms, current, log=None):
    """cuda_event_ms stand-in: runs the forward (which names itself in ``current``), returns
    ``ms[name]`` (a number, or a function of how often that variant was timed)."""
    counts = {}

    def clock(fn):
        fn()
        name = current["name"]
        counts[name] = counts.get(name, 0) + 1
        if log is not None:
            log.append(name)
        value = ms[name]
        return value(counts[name] - 1) if callable(value) else value
    monkeypatch.setattr(bench_models, "cuda_event_ms", clock)


def _variant(current, name, value, exc=None, fail_at=None):
    """A builder whose forward returns {"hidden": value}; raises exc always, or from call fail_at on."""
    calls = {"n": 0}

    def build():
        def fwd():
            current["name"] = name
            calls["n"] += 1
            if exc is not None and (fail_at is None or calls["n"] > fail_at):
                raise exc
            return {"hidden": value}
        return fwd, contextlib.nullcontext
    return build


def test_runner_rows_oom_errors_and_speedups(monkeypatch, tmp_path):
    """A variant that runs out of memory or fails is a row and the rest still run; speedups and the
    attention share come from the timings."""
    ms = {"sdpa": 10.0, "sdpa_cudnn": 8.0, "sage": 5.0, "no_attention": 4.0}
    current = {}
    _fake_clock(monkeypatch, ms, current)
    runner = bench_models.Runner(_args(), torch.device("cpu"), timed=True)
    x = torch.ones(2, 3)
    variants = {"sdpa": _variant(current, "sdpa", x), "sdpa_cudnn": _variant(current, "sdpa_cudnn", x * 1.5),
                "eager": _variant(current, "eager", x, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")),
                "math": _variant(current, "math", x, RuntimeError("No available kernel")),
                "sage": _variant(current, "sage", x * 1.01), "no_attention": _variant(current, "no_attention", x)}
    monkeypatch.setattr(bench_models, "record_sage_calls", lambda: contextlib.nullcontext(
        {"attention_calls": 2, "signatures": {}, "warnings": []}))
    runner.run_size("m", 7, variants, lambda out: out, 2, {"float32": "never"})
    rows = {r["variant"]: r for r in runner.rows}
    assert list(rows) == list(variants)
    assert rows["eager"]["skipped"].startswith("out of memory") and "ms" not in rows["eager"]
    assert rows["math"]["error"].startswith("RuntimeError: No available kernel")
    assert rows["sage"]["speedup_vs_sdpa"] == pytest.approx(2.0)
    assert rows["sage"]["speedup_vs_sdpa_cudnn"] == pytest.approx(1.6)
    assert rows["sage"]["speedup_vs_sdpa_q1_q3"] == pytest.approx([2.0, 2.0])
    assert rows["sage"]["vs_sdpa"]["hidden"]["rel_l1"] == pytest.approx(0.01)
    assert rows["sdpa_cudnn"]["vs_sdpa"]["hidden"]["rel_l1"] == pytest.approx(0.5)
    assert rows["sdpa"]["attention_fraction_est"] == pytest.approx(0.6)
    assert "attention_fraction_est" not in rows["no_attention"]
    assert rows["sdpa"]["iters"] == 1 and rows["sdpa"]["ms_q1"] == rows["sdpa"]["ms_q3"] == 10.0
    table = bench_models.markdown_table([{**r, "model": "dit"} for r in runner.rows])
    assert ("| 7 | 10.00 | 8.00 | 5.00 | 2.00x [2.00–2.00] | 1.60x [1.60–1.60] | 1.00e-02 | err | - | 60% "
            "| 0% / 0% / 0% | - / - | 1 |") in table
    assert "### llama: SKIPPED (no transformers)" in bench_models.markdown_table(
        [{"model": "llama", "skipped": "no transformers"}])
    if importlib.util.find_spec("matplotlib") is not None:
        assert bench_models.plot([{**r, "model": "dit"} for r in runner.rows], tmp_path / "models.png")
        assert (tmp_path / "models.png").stat().st_size > 0


def test_timing_interleaves_rounds_sized_by_min_time(monkeypatch):
    """Warm-up rounds, then timed rounds A B C, B C A, ...; the rounds give the fastest variant
    --min-time of timed forwards; a variant failing while timed leaves the rounds, the others
    keep theirs; medians, quartiles and speedups come from the same rounds."""
    def ramp(base):  # a clock ramp: the first two calls of every variant are slow
        return lambda i: base * (3.0 if i < 2 else 1.0 + 0.01 * (i % 5))

    ms = {"sdpa": ramp(10.0), "sdpa_cudnn": ramp(8.0), "sage": ramp(5.0), "no_attention": ramp(4.0)}
    current, log = {}, []
    _fake_clock(monkeypatch, ms, current, log)
    x = torch.ones(2)
    order = ["sdpa", "sdpa_cudnn", "sage", "no_attention"]
    variants = {name: _variant(current, name, x) for name in order}
    # sdpa_cudnn: out of memory from its 6th forward on (probe + 2 warm-ups + 2 timed rounds ran)
    variants["sdpa_cudnn"] = _variant(current, "sdpa_cudnn", x, torch.OutOfMemoryError("CUDA out of memory"), 5)
    runner = bench_models.Runner(_args(warmup=2, iters=3, min_time=0.15, max_iters=100), torch.device("cpu"),
                                 timed=True)
    runner.run_size("m", 8, variants, lambda out: out, 2, {})
    rows = {r["variant"]: r for r in runner.rows}
    rounds = 13  # ceil(150 ms / 12 ms): no_attention's fastest warm-up, still on the ramp
    survivors = ["sdpa", "sage", "no_attention"]
    # 2 warm-up rounds in order, then timed rounds rotated by one each (round r starts at variant
    # r mod 4) and run backwards in odd rounds; cuDNN fails in timed round 2 and leaves the
    # rounds, the rotation goes on
    def round_order(r):
        o = order[r % 4:] + order[:r % 4]
        return o[::-1] if r % 2 else o
    timed_log = [name for r in range(rounds) for name in round_order(r)
                 if not (name == "sdpa_cudnn" and r >= 2)]
    # a variant follows different ones (a plain rotation kept each one's predecessor)
    before_sage = {seq[i - 1] for seq in (round_order(r) for r in range(4)) for i in range(1, 4) if seq[i] == "sage"}
    assert len(before_sage) == 2
    assert log == order * 2 + timed_log
    assert rows["sdpa_cudnn"]["skipped"].startswith("out of memory while timing") and "ms" not in rows["sdpa_cudnn"]
    for name in survivors:
        r = rows[name]
        assert r["iters"] == rounds and r["warmup"] == 2
        base = {"sdpa": 10.0, "sage": 5.0, "no_attention": 4.0}[name]
        timed = [ms[name](i) for i in range(2, 2 + rounds)]  # after the two warm-ups: the ramp is over
        q1, med, q3 = bench_models.quartiles(timed)
        assert (r["ms_q1"], r["ms"], r["ms_q3"]) == pytest.approx((q1, med, q3))
        assert base <= r["ms_min"] <= r["ms_q1"] <= r["ms"] <= r["ms_q3"] <= r["ms_max"] < 1.05 * base
        assert r["ms_iqr_rel"] == pytest.approx((q3 - q1) / med)
        assert r["timed_s"] == pytest.approx(sum(timed) / 1e3)
        assert "speedup_vs_sdpa_cudnn" not in r
    assert rows["sage"]["speedup_vs_sdpa"] == pytest.approx(2.0)
    assert rows["sage"]["speedup_vs_sdpa_q1_q3"] == pytest.approx([2.0, 2.0])  # same rounds: same ramp phase
    # the caps: --max-iters bounds what --min-time asks for, --iters is the floor, no warm-up: --iters
    assert bench_models.rounds_needed({"a": 0.01}, 10.0, 3, 100) == 100
    assert bench_models.rounds_needed({"a": 1000.0}, 0.5, 10, 200) == 10
    assert bench_models.rounds_needed({"a": 2.0, "b": 1.0}, 0.5, 10, 1000) == 500
    assert bench_models.rounds_needed({"a": 2.0}, 0.0, 10, 1000) == 10


def _timed_cpu_run(monkeypatch, bench, cfg, tokens, args):
    """One size of a quick model through the timed path on the CPU (the clock a perf_counter)."""
    import time

    def clock(fn):
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    monkeypatch.setattr(bench_models, "cuda_event_ms", clock)
    runner = bench_models.Runner(args, torch.device("cpu"), timed=True)
    with bench_models.cpu_sage_emulation("qk_s8_pv_e4m3"):
        bench(runner, cfg, [tokens])
    return {r["variant"]: r for r in runner.rows}


def test_timed_rounds_run_each_variant_own_attention_dit(monkeypatch, spies):
    """DiT through the timed path: interleaving leaves each variant its own attention (sage's
    drop-in only inside the sage variant's context, every call of it)."""
    args = _args(warmup=1, iters=1)
    rows = _timed_cpu_run(monkeypatch, bench_models.bench_dit, bench_models.DIT_QUICK, 32, args)
    blocks = bench_models.DIT_QUICK["blocks"]
    assert len(spies["attention"]) == blocks * (1 + 1 + 1)  # probe, warm-up, 1 round
    assert F.scaled_dot_product_attention is TORCH_SDPA
    for name in ("sdpa", "sage", "no_attention"):
        assert rows[name]["iters"] == 1 and rows[name]["ms"] > 0, rows[name]
    # accuracy references: compared, never timed
    for name in ("math", "float32"):
        assert "ms" not in rows[name] and "vs_sdpa" in rows[name], rows[name]
    assert "skipped" in rows["sdpa_cudnn"]


def test_timed_rounds_run_each_variant_own_attention_llama(monkeypatch, spies):
    """Llama through the timed path: the variants share one model, so each call selects its own
    transformers attention; sage's and the no-attention function see exactly their calls."""
    pytest.importorskip("transformers", reason="transformers is not installed: the Llama model needs it")
    null_calls = []
    real_null = bench_models._hf_no_attention

    def null(module, query, *args, **kwargs):
        null_calls.append(tuple(query.shape))
        return real_null(module, query, *args, **kwargs)

    monkeypatch.setattr(bench_models, "_hf_no_attention", null)
    args = _args(warmup=1, iters=1)
    rows = _timed_cpu_run(monkeypatch, bench_models.bench_llama, bench_models.LLAMA_QUICK, 32, args)
    layers = bench_models.LLAMA_QUICK["layers"]
    assert len(spies["attention"]) == layers * (1 + 1 + 1)
    assert len(null_calls) == layers * (1 + 1 + 1)
    for name in ("sdpa", "sage", "no_attention"):
        assert rows[name]["iters"] == 1 and rows[name]["ms"] > 0, rows[name]
    assert "ms" not in rows["eager"] and "vs_sdpa" in rows["eager"], rows["eager"]  # accuracy reference
    assert rows["sage"]["sage_ran"] == f"emulation qk_s8_pv_e4m3 x{layers}"


def test_compare_is_chunked_and_nan_aware(monkeypatch):
    monkeypatch.setattr(bench_models, "COMPARE_CHUNK_ELEMENTS", 8)
    ref = torch.arange(1.0, 41.0).reshape(2, 5, 4)
    out = bench_models.compare(ref * 1.1, ref)
    assert out["rel_l1"] == pytest.approx(0.1) and out["cos"] == pytest.approx(1.0)
    bad = ref.clone()
    bad[1, 4, 3] = float("nan")
    assert all(v != v for v in bench_models.compare(bad, ref).values())


def test_cuda_event_clock_also_records_the_host_time(monkeypatch):
    """The model benchmark's clock keeps the host time of issuing the forward next to its GPU time
    (host-bound forwards show as host_ms above ms), and the runner reports its median per variant."""
    import time as _time

    class Ev:
        def __init__(self, enable_timing=True):
            self.t = 0.0

        def record(self):
            self.t = _time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Ev)
    ms = bench_models.cuda_event_ms(lambda: _time.sleep(0.002))
    assert ms >= 2.0 and bench_models._last_host_ms[0] >= 2.0
    calls = {"a": (lambda: _time.sleep(0.001), contextlib.nullcontext)}
    times, failed, rounds = bench_models.time_interleaved(calls, 1, 3, 0.0, 3)
    assert rounds == 3 and len(times["a"]) == 3 and not failed
    assert len(bench_models.last_host_ms["a"]) == 3 and min(bench_models.last_host_ms["a"]) >= 1.0
