"""CPU smoke test of the model-level benchmark (``python -m sage_torch.bench --models --quick``)."""

from __future__ import annotations

import json

import pytest

from sage_torch import api, bench, bench_models


def test_quick_dit_runs_through_patch_sdpa(tmp_path, monkeypatch):
    calls = []
    real = api._sdpa_fallback_reason

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "_sdpa_fallback_reason", spy)
    with pytest.warns(Warning):  # CPU tensors: sage's drop-in says it runs PyTorch's SDPA
        assert bench.main(["--models", "--quick", "--models", "dit", "--tokens", "64", "--out", str(tmp_path)]) == 0
    cfg = bench_models.DIT_QUICK
    assert calls and calls[0] == (1, cfg["heads"], 64, cfg["width"] // cfg["heads"]), calls[:2]
    result = json.loads((tmp_path / "models.json").read_text())
    for key in ("device", "torch", "commit", "command", "time", "rows"):
        assert key in result
    (row,) = result["rows"]
    assert row["model"] == "dit" and row["tokens"] == 64
    assert row["rel_l1_sage_vs_sdpa"] < 1e-2 and row["rel_l1_math_vs_sdpa"] < 1e-2
    assert "| dit | 64 |" in (tmp_path / "models.md").read_text()


def test_quick_llama_uses_the_hf_integration(tmp_path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from sage_torch.integrations import hf
    seen = []
    real = hf.hf_attention_forward

    def spy(module, query, *args, **kwargs):
        seen.append(tuple(query.shape))
        return real(module, query, *args, **kwargs)

    hf.hf_attention_forward = spy
    try:
        bench_models.main(["--quick", "--models", "llama", "--tokens", "32", "--out", str(tmp_path)])
    finally:
        hf.hf_attention_forward = real
    assert seen, "attn_implementation='sage' never reached sage's attention function"
    (row,) = json.loads((tmp_path / "models.json").read_text())["rows"]
    assert row["model"] == "llama" and row["rel_l1_sage_vs_sdpa"] < 1e-2
