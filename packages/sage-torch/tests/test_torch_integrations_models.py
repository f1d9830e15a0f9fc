"""The integrations on real (tiny, randomly initialised, CPU) transformers and diffusers models.

CI installs the pinned transformers/diffusers (ci/requirements-test.txt), so these run there;
where a library is not installed (the offline GPU machine) its tests skip with the reason.

On CPU, sage's attention would fall back to PyTorch's SDPA; to exercise the sage path the tests
make CPU tensors look like an sm90 GPU's (``as_arch``), let the SDPA drop-in accept CPU tensors
and register a fake kernel (``fake_backend``: records every call and returns PyTorch's math
result), or run the real recipe's emulation (``SAGE_FORCE_EMULATION=1``).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import sage_torch
from sage_torch import api

try:
    import transformers
except ImportError as _exc:  # the GPU machine may not have it
    transformers = None
    _HF_MISSING = f"transformers is not importable here ({_exc}); CI installs the pinned version"
needs_hf = pytest.mark.skipif(transformers is None, reason=globals().get("_HF_MISSING", ""))


@pytest.fixture
def on_sage(as_arch, fake_backend, monkeypatch):
    """CPU tensors take the sage path; returns the fake kernel (its .calls record each call)."""
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    return fake_backend("qk_s8_pv_e4m3")


def _build(cls, config, impl):
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=impl, torch_dtype=torch.bfloat16).eval()


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _sage_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught if issubclass(w.category, sage_torch.SageFallbackWarning)]


_SMALL = dict(vocab_size=97, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=64, max_position_embeddings=64)


# ----------------------------------------------------------------------------- transformers


@needs_hf
def test_hf_register_sets_attention_and_sdpa_mask():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert sage_torch.register_hf() == "sage"
    assert transformers.AttentionInterface._global_mapping["sage"] is sage_torch.hf_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sage"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]


@needs_hf
def test_hf_llama_runs_sage_and_matches_sdpa(on_sage):
    sage_torch.register_hf()
    config = transformers.LlamaConfig(**_SMALL)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = _logits(_build(transformers.LlamaForCausalLM, config, "sdpa"), input_ids=ids)
    model = _build(transformers.LlamaForCausalLM, config, "sage")
    out, warned = _sage_warnings(lambda: _logits(model, input_ids=ids))
    assert warned == []
    # every layer ran on the (fake) sage kernel: causal, bhsd, GQA kept native (2 kv heads)
    assert len(on_sage.calls) == 2
    for call in on_sage.calls:
        assert call["is_causal"] is True and call["layout"] == "bhsd"
        assert call["shapes"] == ((2, 4, 12, 64), (2, 2, 12, 64)) and call["scale"] == pytest.approx(64 ** -0.5)
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def _padded_ids(seed: int):
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids, mask


@needs_hf
def test_hf_llama_padded_batch_runs_varlen(on_sage):
    sage_torch.register_hf()
    config = transformers.LlamaConfig(**_SMALL)
    ids, mask = _padded_ids(2)
    ref = _logits(_build(transformers.LlamaForCausalLM, config, "sdpa"), input_ids=ids, attention_mask=mask)
    model = _build(transformers.LlamaForCausalLM, config, "sage")
    out, warned = _sage_warnings(lambda: _logits(model, input_ids=ids, attention_mask=mask))
    # the padding-only mask became a pack (unpad -> attention_varlen -> pad): per layer, one sage
    # call per sequence (no varlen kernel registered here: said once), each of its real length
    assert not any("attn_mask is given" in w for w in warned)
    assert len([w for w in warned if "sequence by sequence" in w]) == 1
    assert [c["shapes"][0] for c in on_sage.calls] == [(1, 10, 4, 64), (1, 6, 4, 64), (1, 7, 4, 64)] * 2
    assert all(c["is_causal"] is True and c["layout"] == "bshd" for c in on_sage.calls)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=3e-2, rtol=3e-2)
    # without the registered mask function transformers would pass no mask: the padding would leak
    unpadded = _logits(model, input_ids=ids[1:2, 4:])
    torch.testing.assert_close(out[1, 4:], unpadded[0], atol=3e-2, rtol=3e-2)


@needs_hf
def test_hf_llama_padded_batch_reaches_a_varlen_kernel(as_arch, fake_backend, monkeypatch):
    """A backend with a varlen entry gets the whole pack once per layer."""
    sage_torch.register_hf()
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    packs = []

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal, scale, return_lse, **options):
        packs.append((tuple(q.shape), cu_q.tolist(), cu_k.tolist(), max_q, is_causal))
        from sage_torch.varlen import emulate_varlen
        return emulate_varlen(q, k, v, cu_q, cu_k, "qk_s8_pv_e4m3", is_causal=is_causal, scale=scale), None
    dense = fake_backend("qk_s8_pv_e4m3", varlen=varlen)
    config = transformers.LlamaConfig(**_SMALL)
    ids, mask = _padded_ids(3)
    ref = _logits(_build(transformers.LlamaForCausalLM, config, "sdpa"), input_ids=ids, attention_mask=mask)
    out, warned = _sage_warnings(lambda: _logits(_build(transformers.LlamaForCausalLM, config, "sage"),
                                                 input_ids=ids, attention_mask=mask))
    assert warned == [] and dense.calls == []
    assert packs == [((23, 4, 64), [0, 10, 16, 23], [0, 10, 16, 23], 10, True)] * 2
    keep = mask.bool()
    rel = (out[keep] - ref[keep]).norm() / ref[keep].norm()
    assert rel < 0.05, rel


@needs_hf
def test_hf_llama_padded_batch_emulation_close_to_sdpa(as_arch, monkeypatch):
    """The recipe's numerics per sequence (emulation) in a padded batch: close to SDPA where tokens are real."""
    sage_torch.register_hf()
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("SAGE_FORCE_EMULATION", "1")
    config = transformers.LlamaConfig(**_SMALL)
    ids, mask = _padded_ids(4)
    ref = _logits(_build(transformers.LlamaForCausalLM, config, "sdpa"), input_ids=ids, attention_mask=mask)
    out, warned = _sage_warnings(lambda: _logits(_build(transformers.LlamaForCausalLM, config, "sage"),
                                                 input_ids=ids, attention_mask=mask))
    assert warned == []  # emulation was asked for: sequence by sequence is what it is
    keep = mask.bool()
    rel = (out[keep] - ref[keep]).norm() / ref[keep].norm()
    assert rel < 0.05, rel


@needs_hf
def test_hf_sliding_window_mask_stays_on_sdpa(on_sage):
    """A mask that is more than padding (Mistral's sliding window) keeps PyTorch's SDPA with the mask."""
    sage_torch.register_hf()
    config = transformers.MistralConfig(**_SMALL, sliding_window=4)
    ids, mask = _padded_ids(5)
    ref = _logits(_build(transformers.MistralForCausalLM, config, "sdpa"), input_ids=ids, attention_mask=mask)
    out, warned = _sage_warnings(lambda: _logits(_build(transformers.MistralForCausalLM, config, "sage"),
                                                 input_ids=ids, attention_mask=mask))
    assert on_sage.calls == [] and any("attn_mask is given" in w for w in warned)
    keep = mask.bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=0, rtol=0)


@needs_hf
def test_hf_gemma2_softcap_falls_back_to_eager(on_sage):
    sage_torch.register_hf()
    config = transformers.Gemma2Config(**_SMALL, attn_logit_softcapping=0.5, sliding_window=8)
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    eager = _logits(_build(transformers.Gemma2ForCausalLM, config, "eager"), input_ids=ids)
    sdpa = _logits(_build(transformers.Gemma2ForCausalLM, config, "sdpa"), input_ids=ids)
    model = _build(transformers.Gemma2ForCausalLM, config, "sage")
    out, warned = _sage_warnings(lambda: _logits(model, input_ids=ids))
    assert on_sage.calls == []
    assert len([w for w in warned if "softcap" in w and "Gemma2" in w]) == 1  # once, naming the feature
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    assert (sdpa - eager).abs().max() > 0  # transformers' sdpa drops the soft-capping; sage does not
    # on one attention call with large logits the capping is no detail
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.gemma2 import modeling_gemma2 as gemma2
    attn = model.model.layers[0].self_attn
    q, k, v = (3 * torch.randn(1, h, 6, 64, generator=torch.Generator().manual_seed(i)) for i, h in enumerate((4, 2, 2)))
    kw = dict(scaling=attn.scaling, softcap=attn.attn_logit_softcapping)
    out, _ = sage_torch.hf_attention_forward(attn, q, k, v, None, **kw)
    causal = torch.where(torch.ones(6, 6, dtype=torch.bool).tril(), 0.0, torch.finfo(q.dtype).min)[None, None]
    torch.testing.assert_close(out, gemma2.eager_attention_forward(attn, q, k, v, causal, **kw)[0])
    assert (out - sdpa_attention_forward(attn, q, k, v, None, **kw)[0]).abs().max() > 0.1


@needs_hf
def test_hf_gpt_oss_without_sdpa_support_falls_back_to_eager(on_sage):
    sage_torch.register_hf()
    config = transformers.GptOssConfig(**_SMALL, num_local_experts=2, num_experts_per_tok=1, sliding_window=8)
    assert transformers.GptOssForCausalLM._supports_sdpa is False
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(4))
    eager = _logits(_build(transformers.GptOssForCausalLM, config, "eager"), input_ids=ids)
    model = _build(transformers.GptOssForCausalLM, config, "sage")
    out, warned = _sage_warnings(lambda: _logits(model, input_ids=ids))
    assert on_sage.calls == []
    assert any("_supports_sdpa = False" in w and "GptOss" in w for w in warned)
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    with pytest.raises(sage_torch.SageDispatchError, match="_supports_sdpa"):
        import os
        os.environ["SAGE_STRICT"] = "1"
        try:
            _logits(model, input_ids=ids)
        finally:
            del os.environ["SAGE_STRICT"]


@needs_hf
def test_hf_attention_sinks_are_not_dropped(on_sage, seed):
    """s_aux on a module whose model does support SDPA (a model file of ours would do the same)."""
    from transformers.models.gpt_oss import modeling_gpt_oss as gpt_oss
    config = transformers.GptOssConfig(**_SMALL, num_local_experts=2, num_experts_per_tok=1)
    attn = gpt_oss.GptOssAttention(config, layer_idx=0).eval()
    torch.nn.init.normal_(attn.sinks, std=2.0, generator=torch.Generator().manual_seed(seed))
    q, k, v = (torch.randn(1, h, 6, 64, generator=torch.Generator().manual_seed(seed + i))
               for i, h in enumerate((4, 2, 2)))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    orig = gpt_oss.GptOssPreTrainedModel._supports_sdpa
    sage_torch.integrations.hf._SDPA_SUPPORT.clear()
    try:
        gpt_oss.GptOssPreTrainedModel._supports_sdpa = True  # pretend: only s_aux is left to refuse
        for sub in (gpt_oss.GptOssModel, gpt_oss.GptOssForCausalLM):
            sub._supports_sdpa = True
        out, warned = _sage_warnings(lambda: sage_torch.hf_attention_forward(
            attn, q, k, v, None, scaling=attn.scaling, s_aux=attn.sinks, sliding_window=None))
    finally:
        for sub in (gpt_oss.GptOssPreTrainedModel, gpt_oss.GptOssModel, gpt_oss.GptOssForCausalLM):
            sub._supports_sdpa = orig
        sage_torch.integrations.hf._SDPA_SUPPORT.clear()
    ref, _ = gpt_oss.eager_attention_forward(attn, q, k, v, torch.where(mask, 0.0, torch.finfo(q.dtype).min),
                                             scaling=attn.scaling, s_aux=attn.sinks)
    assert on_sage.calls == [] and any("s_aux" in w and "attention sinks" in w for w in warned)
    torch.testing.assert_close(out[0], ref)


@needs_hf
def test_hf_t5_position_bias_uses_transformers_sdpa(on_sage):
    sage_torch.register_hf()
    if not transformers.T5ForConditionalGeneration._supports_sdpa:
        pytest.skip(f"transformers {transformers.__version__}'s T5 has no SDPA path (it never calls the "
                    f"attention interface)")
    config = transformers.T5Config(vocab_size=97, d_model=128, d_kv=64, d_ff=64, num_layers=2, num_heads=2)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    inputs = dict(input_ids=ids, decoder_input_ids=ids[:, :5])
    ref = _logits(_build(transformers.T5ForConditionalGeneration, config, "sdpa"), **inputs)
    model = _build(transformers.T5ForConditionalGeneration, config, "sage")
    out, warned = _sage_warnings(lambda: _logits(model, **inputs))
    assert on_sage.calls == [] and len([w for w in warned if "position_bias" in w]) == 1
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@needs_hf
def test_hf_unknown_kwarg_is_not_swallowed(on_sage, seed):
    q, k, v = (torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(seed + i)) for i in range(3))

    class Plain(torch.nn.Module):
        is_causal = True
    with pytest.raises(NotImplementedError, match="some_new_feature"):
        sage_torch.hf_attention_forward(Plain(), q, k, v, None, some_new_feature=1.0)
    # None-valued and metadata kwargs are ignored, as transformers' sdpa does
    out, _ = sage_torch.hf_attention_forward(Plain(), q.bfloat16(), k.bfloat16(), v.bfloat16(), None,
                                             softcap=None, s_aux=None, sliding_window=4096, position_ids=None)
    assert out.shape == (1, 5, 2, 64) and len(on_sage.calls) == 1


@needs_hf
def test_hf_llama_emulation_close_to_sdpa(as_arch, monkeypatch):
    """The real sage numerics (qk_s8_pv_e4m3 emulation) inside a model: close to SDPA."""
    sage_torch.register_hf()
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("SAGE_FORCE_EMULATION", "1")
    config = transformers.LlamaConfig(**_SMALL)
    ids = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(6))
    ref = _logits(_build(transformers.LlamaForCausalLM, config, "sdpa"), input_ids=ids)
    out = _logits(_build(transformers.LlamaForCausalLM, config, "sage"), input_ids=ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel


# ----------------------------------------------------------------------------- diffusers


def _diffusers():
    try:
        import diffusers
    except ImportError as exc:
        pytest.skip(f"diffusers is not importable here ({exc}); CI installs the pinned version")
    return diffusers


def _tiny_flux(diffusers):
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        axes_dims_rope=(16, 24, 24)).to(torch.bfloat16).eval()


def _flux_inputs(b=2, img=16, txt=7):
    g = torch.Generator().manual_seed(7)
    return dict(hidden_states=torch.randn(b, img, 16, generator=g).bfloat16(),
                encoder_hidden_states=torch.randn(b, txt, 32, generator=g).bfloat16(),
                pooled_projections=torch.randn(b, 16, generator=g).bfloat16(),
                timestep=torch.tensor([0.5] * b).bfloat16(),
                img_ids=torch.randint(0, 4, (img, 3), generator=g).float(), txt_ids=torch.zeros(txt, 3))


def _tiny_wan(diffusers):
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32).to(torch.bfloat16).eval()


def _wan_inputs(b=1):
    g = torch.Generator().manual_seed(8)
    return dict(hidden_states=torch.randn(b, 4, 2, 8, 8, generator=g).bfloat16(),
                timestep=torch.tensor([500] * b), encoder_hidden_states=torch.randn(b, 6, 32, generator=g).bfloat16())


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0].float()


@pytest.mark.parametrize("which", ["flux", "wan"])
def test_diffusers_backend_runs_sage_and_matches_native(on_sage, which):
    diffusers = _diffusers()
    model, inputs = (_tiny_flux(diffusers), _flux_inputs()) if which == "flux" else (_tiny_wan(diffusers), _wan_inputs())
    ref = _run(model, inputs)
    assert sage_torch.integrations.register_diffusers() == "sage_torch"
    registry = diffusers.models.attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend  # newer diffusers make set_attention_backend global too
    model.set_attention_backend("sage_torch")
    try:
        out, warned = _sage_warnings(lambda: _run(model, inputs))
    finally:
        model.reset_attention_backend()
        registry._active_backend = active
    assert warned == []
    if which == "flux":  # one joint block (7 text + 16 image tokens), one single block: 2 calls
        assert [c["shapes"] for c in on_sage.calls] == [((2, 23, 2, 64), (2, 23, 2, 64))] * 2
    else:  # per block: self-attention over 2*4*4 = 32 patches, cross-attention to 6 text tokens
        assert [c["shapes"] for c in on_sage.calls] == [((1, 32, 2, 64), (1, 32, 2, 64)),
                                                        ((1, 32, 2, 64), (1, 6, 2, 64))] * 2
    assert all(c["layout"] == "bshd" and c["is_causal"] is False for c in on_sage.calls)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_diffusers_backend_falls_back_loudly(on_sage, seed):
    _diffusers()
    from sage_torch.integrations.diffusers import diffusers_attention_backend
    q, k, v = (torch.randn(2, 5, 2, 64, generator=torch.Generator().manual_seed(seed + i)).bfloat16()
               for i in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    out, warned = _sage_warnings(lambda: diffusers_attention_backend(q, k, v, attn_mask=mask))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask[:, None, None, :]).transpose(1, 2)
    assert on_sage.calls == [] and any("attn_mask" in w for w in warned)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="context parallelism"):
        diffusers_attention_backend(q, k, v, _parallel_config=object())


def test_diffusers_backend_emulation_close_to_native(as_arch, monkeypatch):
    diffusers = _diffusers()
    as_arch("sm90")
    monkeypatch.setattr(api, "SDPA_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setenv("SAGE_FORCE_EMULATION", "1")
    model, inputs = _tiny_flux(diffusers), _flux_inputs()
    ref = _run(model, inputs)
    sage_torch.integrations.register_diffusers()
    with diffusers.attention_backend("sage_torch"):
        out = _run(model, inputs)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_diffusers_processor_refuses_flux(on_sage):
    diffusers = _diffusers()
    model = _tiny_flux(diffusers)
    model.set_attn_processor(sage_torch.SageAttnProcessor())
    with pytest.raises(TypeError, match="set_attention_backend"):
        _run(model, _flux_inputs())


def test_diffusers_processor_matches_attn_processor_2_0(on_sage, seed):
    diffusers = _diffusers()
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(seed % 1000)
    attn = Attention(query_dim=128, heads=2, dim_head=64, cross_attention_dim=32).to(torch.bfloat16).eval()
    x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(seed)).bfloat16()
    ctx = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    with torch.no_grad():
        ref = AttnProcessor2_0()(attn, x, encoder_hidden_states=ctx)
        out = sage_torch.SageAttnProcessor()(attn, x, encoder_hidden_states=ctx)
    assert [c["shapes"] for c in on_sage.calls] == [((2, 2, 10, 64), (2, 2, 5, 64))]
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    assert diffusers is not None
