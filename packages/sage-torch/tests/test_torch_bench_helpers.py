"""CPU checks of small helpers used on the GPU path: the bench's --recipes parser and the sm90
backend's DLPack hand-off to sage_core."""

import pytest
import torch

from sage_torch import bench


def test_parse_forced_plain_and_options():
    assert bench.parse_forced("qk_s8_pv_f16") == ("qk_s8_pv_f16", {})
    recipe, opts = bench.parse_forced("qk_s8_pv_e4m3:pv_accum=f16_buffer,v_max=2.25,kv_block=64,smooth_v=false,x=none")
    assert recipe == "qk_s8_pv_e4m3"
    assert opts == {"pv_accum": "f16_buffer", "v_max": 2.25, "kv_block": 64, "smooth_v": False, "x": None}
    assert isinstance(opts["kv_block"], int) and isinstance(opts["v_max"], float)


@pytest.mark.parametrize("spec", ["qk_s8_pv_f16:pv_accum", "qk_s8_pv_f16:=3", "qk_s8_pv_f16:a=1,b"])
def test_parse_forced_rejects_malformed(spec):
    with pytest.raises(ValueError, match="opt=value"):
        bench.parse_forced(spec)


def test_bench_main_rejects_bad_spec_before_any_work():
    with pytest.raises(ValueError, match="opt=value"):
        bench.main(["--recipes", "qk_s8_pv_f16:oops"])


def test_sm90_dl_capsule_roundtrip():
    sm90 = pytest.importorskip("sage_torch.backends.sm90")
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1:]  # a strided view
    cap = sm90._dl(t)
    assert type(cap).__name__ == "PyCapsule"
    back = torch.utils.dlpack.from_dlpack(cap)
    assert back.data_ptr() == t.data_ptr() and back.stride() == t.stride() and torch.equal(back, t)
    assert sm90._dl(None) is None
    g = torch.zeros(3, requires_grad=True)
    assert sm90._dl(g) is g  # left to Tensor.__dlpack__, which refuses it with a clear error



class _FakeEvent:
    clock = [0.0]

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = _FakeEvent.clock[0]

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.t - self.t


def test_time_cuda_interleaved_rotates_and_takes_medians(monkeypatch):
    """Warm-up calls first, then rounds of per_round timed calls, the order rotated by one each round;
    the figure is the median of each callable's samples."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    log = []

    def make(name, ms):
        def fn():
            log.append(name)
            _FakeEvent.clock[0] += ms
        return fn

    fns = {"a": make("a", 1.0), "b": make("b", 2.0), "c": make("c", 3.0)}
    out = bench.time_cuda_interleaved(fns, warmup=2, rounds=3, per_round=2)
    assert out == {"a": 1.0, "b": 2.0, "c": 3.0}
    warm = ["a", "a", "b", "b", "c", "c"]
    timed = ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert log == warm + timed


def test_emulated_mmas_say_what_the_gpu_runs_natively():
    """The sm80 family's mma.sync instructions per recipe and arch (docs/perf/sm80_family_blackwell.md):
    FP8 is native on sm_89/120/121 only, INT4 on sm_80-89 only; INT8 and FP16 everywhere."""
    from sage_torch.backends import sm80

    assert sm80.emulated_mmas("qk_s8_pv_f16", "sm90") == ()
    assert sm80.emulated_mmas("qk_s8_pv_s8", "sm100") == ()
    assert sm80.emulated_mmas("qk_s8_pv_e4m3", "sm89") == ()
    assert sm80.emulated_mmas("qk_s8_pv_e4m3", "sm90") == ("QMMA.E4M3",)
    assert sm80.emulated_mmas("qk_s8_pv_e4m3", "sm120") == ()
    assert sm80.emulated_mmas("qk_s4_pv_e4m3", "sm90") == ("IMMA.S4", "QMMA.E4M3")
    assert sm80.emulated_mmas("qk_s4_pv_e4m3", "sm86") == ("QMMA.E4M3",)
    with pytest.raises(ValueError, match="unknown sm80-family recipe"):
        sm80.emulated_mmas("qk_nvfp4_pv_nvfp4", "sm120")


def test_bench_table_names_the_backend_and_emulated_instructions(capsys):
    rows = [{"impl": "sage_qk_s8_pv_e4m3", "d": 128, "causal": False, "n": 4096, "tops": 300.0, "rel_l1": 0.04,
             "backend": "sm80_qk_s8_pv_e4m3", "native": False, "emulated": ["QMMA.E4M3"]},
            {"impl": "sdpa_flash", "d": 128, "causal": False, "n": 4096, "tops": 340.0, "rel_l1": 0.002}]
    text = bench.print_table(rows)
    assert "| sage_qk_s8_pv_e4m3 (sm80_qk_s8_pv_e4m3; emulated here: QMMA.E4M3) | 300 |" in text
    assert "| sdpa_flash | 340 |" in text


def test_family_prefix_runs_that_backend_directly_or_says_why_not(monkeypatch, fake_backend):
    """--recipes sm80/qk_s8_pv_e4m3 times that family's backend itself (dispatch would take the wgmma
    kernel on a Hopper): called with the call's scale, its supports() checked first (a declined call
    is an error row, never a fallback); an unknown backend is a ValueError."""
    fake = fake_backend("qk_s8_pv_e4m3", archs=("sm80", "sm90"), name="sm80_qk_s8_pv_e4m3")
    declining = fake_backend("qk_s8_pv_s8", archs=("sm90",), name="sm80_qk_s8_pv_s8",
                             supports=lambda *a, **k: "no kernel in this build")
    monkeypatch.setattr(bench, "FORCED_RECIPES", ["sm80/qk_s8_pv_e4m3", "sm80/qk_s8_pv_s8", "qk_s8_pv_f16"])
    impls = bench.sage_impls()
    assert impls["sage_sm80/qk_s8_pv_e4m3"]["family"] == "sm80" and impls["sage_qk_s8_pv_f16"]["family"] is None
    q = torch.randn(1, 2, 64, 64, dtype=torch.bfloat16)
    out = impls["sage_sm80/qk_s8_pv_e4m3"]["e2e"](q, q, q, True)
    assert out.shape == q.shape and fake.calls[-1]["is_causal"] and fake.calls[-1]["scale"] == 64 ** -0.5
    with pytest.raises(RuntimeError, match="backend sm80_qk_s8_pv_s8 cannot run this call: no kernel"):
        impls["sage_sm80/qk_s8_pv_s8"]["e2e"](q, q, q, False)
    assert not declining.calls
    with pytest.raises(ValueError, match="no backend 'sm99_qk_s8_pv_f16'"):
        bench._family_impl("sm99", "qk_s8_pv_f16", {})
    assert bench.instruction_note("qk_s8_pv_e4m3", q, "sm80")["backend"] == "sm80_qk_s8_pv_e4m3"
