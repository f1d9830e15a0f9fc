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
    base = dict(warmup=0, iters=1, dense_max_tokens=16384)
    return argparse.Namespace(**{**base, **kw})


def test_runner_rows_oom_errors_and_speedups(monkeypatch, tmp_path):
    """A variant that runs out of memory or fails is a row and the rest still run; speedups and the
    attention share come from the timings."""
    ms = {"sdpa": 10.0, "sdpa_cudnn": 8.0, "sage": 5.0, "no_attention": 4.0}
    current = {}
    monkeypatch.setattr(bench_models, "time_forward", lambda fn, warmup, iters: {"ms": ms[current["name"]]})
    runner = bench_models.Runner(_args(), torch.device("cpu"), timed=True)
    x = torch.ones(2, 3)

    def variant(name, value=None, exc=None):
        def build():
            current["name"] = name

            def fwd():
                if exc is not None:
                    raise exc
                return {"hidden": x if value is None else value}
            return fwd, contextlib.nullcontext
        return build

    variants = {"sdpa": variant("sdpa"), "sdpa_cudnn": variant("sdpa_cudnn", x * 1.5),
                "eager": variant("eager", exc=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate")),
                "math": variant("math", exc=RuntimeError("No available kernel")),
                "sage": variant("sage", x * 1.01), "no_attention": variant("no_attention")}
    monkeypatch.setattr(bench_models, "record_sage_calls", lambda: contextlib.nullcontext(
        {"attention_calls": 2, "signatures": {}, "warnings": []}))
    runner.run_size("m", 7, variants, lambda out: out, 2, {"float32": "never"})
    rows = {r["variant"]: r for r in runner.rows}
    assert rows["eager"]["skipped"].startswith("out of memory") and "ms" not in rows["eager"]
    assert rows["math"]["error"].startswith("RuntimeError: No available kernel")
    assert rows["sage"]["speedup_vs_sdpa"] == pytest.approx(2.0)
    assert rows["sage"]["speedup_vs_sdpa_cudnn"] == pytest.approx(1.6)
    assert rows["sage"]["vs_sdpa"]["hidden"]["rel_l1"] == pytest.approx(0.01)
    assert rows["sdpa_cudnn"]["vs_sdpa"]["hidden"]["rel_l1"] == pytest.approx(0.5)
    assert rows["sdpa"]["attention_fraction_est"] == pytest.approx(0.6)
    assert "attention_fraction_est" not in rows["no_attention"]
    table = bench_models.markdown_table([{**r, "model": "dit"} for r in runner.rows])
    assert "| 7 | 10.00 | 8.00 | 5.00 | 2.00x | 1.60x | 1.00e-02 | err | - | 60% |" in table
    assert "### llama: SKIPPED (no transformers)" in bench_models.markdown_table(
        [{"model": "llama", "skipped": "no transformers"}])
    if importlib.util.find_spec("matplotlib") is not None:
        assert bench_models.plot([{**r, "model": "dit"} for r in runner.rows], tmp_path / "models.png")
        assert (tmp_path / "models.png").stat().st_size > 0


def test_compare_is_chunked_and_nan_aware(monkeypatch):
    monkeypatch.setattr(bench_models, "COMPARE_CHUNK_ELEMENTS", 8)
    ref = torch.arange(1.0, 41.0).reshape(2, 5, 4)
    out = bench_models.compare(ref * 1.1, ref)
    assert out["rel_l1"] == pytest.approx(0.1) and out["cos"] == pytest.approx(1.0)
    bad = ref.clone()
    bad[1, 4, 3] = float("nan")
    assert all(v != v for v in bench_models.compare(bad, ref).values())
