"""Dispatch decisions, with the device arch and the backend registry mocked on CPU."""

import warnings

import pytest
import torch

import sage_quant
import sage_torch
from sage_torch import _dispatch, backends
from sage_torch._torch_fallback import torch_attention
from sage_torch_testing import make_qkv

BF16 = torch.bfloat16


def test_auto_picks_registered_kernel(as_arch, fake_backend, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3", archs=("sm90",), marker=1.0)
    q, k, v = make_qkv(h_q=4, h_kv=2, s_q=9, s_kv=13, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # a kernel path must not warn
        o, lse = sage_torch.attention(q, k, v, is_causal=True, return_lse=True, scale=0.3)
    assert len(fn.calls) == 1
    call = fn.calls[0]
    assert call["layout"] == "bhsd" and call["is_causal"] is True and call["scale"] == 0.3
    assert call["return_lse"] is True and call["options"] == {}
    ref_o, ref_lse = torch_attention(q, k, v, layout="bhsd", is_causal=True, scale=0.3, return_lse=True)
    torch.testing.assert_close(o, ref_o + 1.0)
    torch.testing.assert_close(lse, ref_lse)


def test_default_scale_passed_to_backend(as_arch, fake_backend, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(d=128, seed=seed)
    sage_torch.attention(q, k, v)
    assert fn.calls[0]["scale"] == pytest.approx(128 ** -0.5)


@pytest.mark.parametrize("arch, expected", [
    ("sm80", "qk_s8_pv_f16"), ("sm86", "qk_s8_pv_f16"), ("sm89", "qk_s8_pv_e4m3"),
    ("sm90", "qk_s8_pv_e4m3"), ("sm100", "qk_s8_pv_f16"), ("sm103", "qk_s8_pv_f16"),
    ("sm120", "qk_nvfp4_pv_nvfp4"), ("sm121", "qk_nvfp4_pv_nvfp4"),
])
def test_arch_table_default(arch, expected, fake_backend):
    for recipe in sage_quant.RECIPES:
        fake_backend(recipe, archs=(arch,))
    for dtype in (torch.float16, BF16):
        for hd in (64, 128):
            decision = _dispatch.resolve(arch, dtype, hd, "auto")
            assert decision.kind == "kernel" and decision.recipe == expected, decision


def test_auto_preference_falls_to_second_recipe(fake_backend):
    fake_backend("qk_s8_pv_f16", archs=("sm90",))
    decision = _dispatch.resolve("sm90", BF16, 64, "auto")
    assert decision.kind == "kernel" and decision.recipe == "qk_s8_pv_f16"


def test_table_respects_dtype_head_dim_and_arch(fake_backend):
    fake_backend("qk_s8_pv_e4m3", archs=("sm90",), head_dims=(128,), dtypes=(torch.float16,))
    assert _dispatch.resolve("sm90", torch.float16, 128).kind == "kernel"
    for arch, dtype, hd in (("sm90", BF16, 128), ("sm90", torch.float16, 64), ("sm89", torch.float16, 128)):
        decision = _dispatch.resolve(arch, dtype, hd)
        assert decision.kind == "torch" and decision.warn, (arch, dtype, hd, decision)
    assert "no registered and available kernel for sm90, bfloat16, head_dim=128" in \
        _dispatch.resolve("sm90", BF16, 128).reason


def test_unavailable_backend_is_skipped_and_reported(fake_backend):
    def broken():
        raise OSError("libsage missing")
    fake_backend("qk_s8_pv_e4m3", name="off", available=False)
    fake_backend("qk_s8_pv_e4m3", name="broken", available=broken)
    assert _dispatch.resolve("sm90", BF16, 64).kind == "torch"
    why = _dispatch.unavailable_backends()
    assert why["off"] == "available() returned False"
    assert "OSError: libsage missing" in why["broken"]
    info = sage_torch.info()
    rows = {r["name"]: r for r in info["backends"]}
    assert rows["off"]["available"] is False and "OSError" in rows["broken"]["unavailable_reason"]


def test_first_registered_wins_and_supports_veto(as_arch, fake_backend, seed):
    as_arch("sm90")
    first = fake_backend("qk_s8_pv_e4m3", name="first",
                         supports=lambda q, k, v, **kw: "no causal" if kw["is_causal"] else None)
    second = fake_backend("qk_s8_pv_e4m3", name="second")
    q, k, v = make_qkv(seed=seed)
    sage_torch.attention(q, k, v)
    sage_torch.attention(q, k, v, is_causal=True)
    assert len(first.calls) == 1 and len(second.calls) == 1 and second.calls[0]["is_causal"]


def test_native_backend_comes_before_one_that_only_runs_there(as_arch, fake_backend, seed):
    """The sm80 mma.sync kernels also run on sm90: registered first, they must still lose there to
    a backend written for sm90, and win on their own archs."""
    ported = fake_backend("qk_s8_pv_e4m3", archs=("sm89", "sm90"), native_archs=("sm89",), name="ported")
    native = fake_backend("qk_s8_pv_e4m3", archs=("sm90",), name="native")
    q, k, v = make_qkv(seed=seed)
    as_arch("sm90")
    sage_torch.attention(q, k, v)
    as_arch("sm89")
    sage_torch.attention(q, k, v)
    assert len(native.calls) == 1 and len(ported.calls) == 1
    assert [sp.name for sp in _dispatch.lookup("sm90", "qk_s8_pv_e4m3", BF16, 64)] == ["native", "ported"]


def test_veto_reason_reaches_the_warning(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3", supports=lambda *a, **kw: "s_q must be even")
    q, k, v = make_qkv(seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match="s_q must be even"):
        sage_torch.attention(q, k, v)


def test_register_backend_validation():
    fn, ok = (lambda *a, **k: None), (lambda: True)
    with pytest.raises(ValueError, match="unknown recipe 'qk_s7'"):
        backends.register_backend("x", "qk_s7", ("sm90",), (64,), fn, ok)
    with pytest.raises(ValueError, match="archs must be arch families"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("hopper",), (64,), fn, ok)
    with pytest.raises(ValueError, match="head_dims must be positive ints"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64.0,), fn, ok)
    with pytest.raises(ValueError, match="dtypes must be among"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64,), fn, ok, dtypes=(torch.float32,))
    with pytest.raises(TypeError, match="must be callable"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64,), fn, True)
    with pytest.raises(ValueError, match="native_archs"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64,), fn, ok, native_archs=("sm80",))
    backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64,), fn, ok)
    with pytest.raises(ValueError, match="already registered"):
        backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (64,), fn, ok)
    backends.register_backend("x", "qk_s8_pv_e4m3", ("sm90",), (128,), fn, ok, replace=True)
    assert _dispatch.resolve("sm90", BF16, 128).backend.name == "x"
    assert backends.unregister_backend("x") is not None
    assert _dispatch.resolve("sm90", BF16, 128).kind == "torch"


def test_backend_output_is_checked(as_arch, seed):
    as_arch("sm90")
    backends.register_backend("bad", "qk_s8_pv_e4m3", ("sm90",), (64,),
                              lambda q, k, v, **kw: (q.float(), None), lambda: True)
    q, k, v = make_qkv(seed=seed)
    with pytest.raises(RuntimeError, match="backend 'bad' returned o = .*float32"):
        sage_torch.attention(q, k, v)


# ------------------------------------------------------------------ fallback warning / strict


def test_fallback_warns_once(seed):
    q, k, v = make_qkv(seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match="no sage kernel for device arch 'cpu'") as rec:
        sage_torch.attention(q, k, v)
        sage_torch.attention(q, k, v)
        sage_torch.attention(q, k, v, is_causal=True)
    assert len([w for w in rec if issubclass(w.category, sage_torch.SageFallbackWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)
        sage_torch.attention(q, k, v)  # still silent afterwards


def test_strict_raises(seed, monkeypatch):
    q, k, v = make_qkv(seed=seed)
    with pytest.raises(sage_torch.SageDispatchError, match="strict mode: no sage kernel for device arch 'cpu'"):
        sage_torch.attention(q, k, v, strict=True)
    monkeypatch.setenv("SAGE_STRICT", "1")
    with pytest.raises(sage_torch.SageDispatchError):
        sage_torch.attention(q, k, v)
    with pytest.raises(sage_torch.SageDispatchError, match="not falling back to the emulation"):
        sage_torch.attention(q, k, v, recipe="qk_s8_pv_f16")
    # asking for the emulation explicitly is not a fallback
    sage_torch.attention(q, k, v, recipe="qk_s8_pv_f16", emulate=True)
    with pytest.warns(sage_torch.SageFallbackWarning):
        sage_torch.attention(q, k, v, strict=False)  # the argument wins over the environment
    monkeypatch.setenv("SAGE_STRICT", "maybe")
    with pytest.raises(ValueError, match="SAGE_STRICT='maybe' is not a boolean"):
        sage_torch.attention(q, k, v)


def test_strict_kernel_path_does_not_raise(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(seed=seed)
    sage_torch.attention(q, k, v, strict=True)


# ------------------------------------------------------------------ forcing


def test_force_recipe_env(as_arch, fake_backend, monkeypatch, seed):
    as_arch("sm90")
    e4m3 = fake_backend("qk_s8_pv_e4m3")
    f16 = fake_backend("qk_s8_pv_f16")
    q, k, v = make_qkv(seed=seed)
    monkeypatch.setenv("SAGE_FORCE_RECIPE", "qk_s8_pv_f16")
    sage_torch.attention(q, k, v)
    assert len(f16.calls) == 1 and not e4m3.calls
    sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3")  # an explicit argument wins
    assert len(e4m3.calls) == 1
    monkeypatch.setenv("SAGE_FORCE_RECIPE", "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # asked for: no warning
        o = sage_torch.attention(q, k, v)
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=0, atol=0)
    assert len(f16.calls) == 1 and len(e4m3.calls) == 1
    monkeypatch.delenv("SAGE_FORCE_RECIPE")
    torch.testing.assert_close(sage_torch.attention(q, k, v, recipe="torch"), o, rtol=0, atol=0)
    assert len(f16.calls) == 1 and len(e4m3.calls) == 1
    monkeypatch.setenv("SAGE_FORCE_RECIPE", "qk_bogus")
    with pytest.raises(ValueError, match="unknown SAGE_FORCE_RECIPE='qk_bogus'"):
        sage_torch.attention(q, k, v)


def test_explicit_recipe_without_kernel_emulates(as_arch, fake_backend, seed):
    as_arch("sm90")
    fake_backend("qk_s8_pv_e4m3")  # a kernel for another recipe does not count
    decision = _dispatch.resolve("sm90", BF16, 64, "qk_s8_pv_s8")
    assert decision.kind == "emulation" and decision.warn and "qk_s8_pv_s8" in decision.reason


def test_emulate_flag_overrides_kernel(as_arch, fake_backend, monkeypatch, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(seed=seed)
    ref = sage_quant.emulate(q, k, v, "qk_s8_pv_e4m3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sage_torch.SageFallbackWarning)  # asked for: no warning
        o1 = sage_torch.attention(q, k, v, recipe="qk_s8_pv_e4m3", emulate=True)
        o2 = sage_torch.attention(q, k, v, emulate=True)  # auto -> the arch's default recipe
        monkeypatch.setenv("SAGE_FORCE_EMULATION", "1")
        o3 = sage_torch.attention(q, k, v)
    assert not fn.calls
    for o in (o1, o2, o3):
        torch.testing.assert_close(o, ref, rtol=0, atol=0)


def test_emulate_auto_on_cpu_needs_recipe(seed):
    q, k, v = make_qkv(seed=seed)
    with pytest.raises(ValueError, match="no default recipe; pass recipe="):
        sage_torch.attention(q, k, v, emulate=True)


def test_options_forwarded_to_kernel(as_arch, fake_backend, seed):
    as_arch("sm90")
    fn = fake_backend("qk_s8_pv_e4m3")
    q, k, v = make_qkv(seed=seed)
    sage_torch.attention(q, k, v, smooth_k=False, kv_block=64)
    assert fn.calls[0]["options"] == {"smooth_k": False, "kv_block": 64}
    with pytest.raises(TypeError, match=r"unknown recipe option\(s\) \['pv_dtype'\] for recipe\(s\) \['qk_s8_pv_e4m3'\]"):
        sage_torch.attention(q, k, v, pv_dtype="fp16")  # an option of another recipe


def test_options_ignored_on_fallback_are_named(seed):
    q, k, v = make_qkv(seed=seed)
    with pytest.warns(sage_torch.SageFallbackWarning, match=r"Recipe options \['smooth_k'\] are ignored"):
        sage_torch.attention(q, k, v, smooth_k=False)


def test_options_roundtrip():
    opts = {"a": True, "b": 3, "c": 0.25, "d": "per_thread", "e": None, "f": "x;y=z"}
    assert _dispatch.decode_options(_dispatch.encode_options(opts)) == opts
    assert _dispatch.encode_options({}) == ""


def test_backend_modules_reported():
    status = backends.load_backend_modules()
    for name in backends.BUILTIN_BACKEND_MODULES:
        assert status[name] == "loaded" or status[name] == "not present" or status[name].startswith("failed: ")
