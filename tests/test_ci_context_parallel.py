"""ci/context_parallel.sh and the benchmark it launches (sage_torch.bench_context_parallel), on CPU:
argument parsing, the launcher's environment and command, a world of one in this process and a
real torchrun launch of two gloo processes (tiny problems)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
bench = pytest.importorskip("sage_torch.bench_context_parallel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "ci" / "context_parallel.sh"
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def test_defaults_are_the_issue_14_problem():
    args = bench.parse_args([])
    assert args.tokens == [32768, 65536, 131072, 262144] and args.head_dim == 128 and args.causal == "both"
    assert args.schemes == ["ring", "ulysses"] and args.impls == ["sage", "sdpa"] and args.kv_heads == args.heads
    assert 0 < args.ref_tokens < min(args.tokens)
    quick = bench.parse_args(["--quick", "--device", "cpu"])
    assert quick.tokens == [64] and quick.iters == 1 and quick.device == "cpu"


@pytest.mark.parametrize("argv, match", [(["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
                                         (["--iters", "0"], "--iters must be >= 1"),
                                         (["--schemes", "tree"], "invalid choice")])
def test_bad_arguments(argv, match, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)
    assert match in capsys.readouterr().err


@needs_bash
def test_launcher_sets_multicast_off_and_runs_torchrun(tmp_path):
    env = {**os.environ, "SAGE_CP_DRY_RUN": "1", "SAGE_CP_NPROC": "2", "OUT": str(tmp_path), "PYTHON": sys.executable}
    for name in bench.MULTICAST_OFF_ENV:
        env.pop(name, None)
    out = subprocess.run(["bash", str(SCRIPT), "--tokens", "65536"], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1" in out
    assert (f"-m torch.distributed.run --standalone --nproc-per-node 2 -m sage_torch.bench_context_parallel "
            f"--out {tmp_path}/context_parallel --tokens 65536") in out


def test_multicast_env_is_set_when_missing(monkeypatch):
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    monkeypatch.setenv("NVSHMEM_DISABLE_NVLS", "1")
    seen = bench.multicast_env()
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and seen["NCCL_NVLS_ENABLE"] == {"inherited": None, "now": "0"}
    assert seen["NVSHMEM_DISABLE_NVLS"]["inherited"] == "1"


def _check_result(result: dict, world: int) -> None:
    assert result["meta"]["world_size"] == world and result["meta"]["backend"] == "gloo"
    assert len(result["meta"]["multicast_env_per_rank"]) == world
    assert all(r[n]["now"] == v for r in result["meta"]["multicast_env_per_rank"]
               for n, v in bench.MULTICAST_OFF_ENV.items())
    assert len(result["checks"]) == 8 and all(c["ok"] for c in result["checks"]), result["checks"]
    rows = [t for t in result["timings"] if "ms" in t]
    assert len(rows) == 8
    for t in rows:
        assert len(t["ms_per_rank"]) == world and len(t["comm_ms_per_rank"]) == world
        assert len(t["compute_ms_per_rank"]) == world and 0 <= t["spread"] < 1
    assert len(result["speedups"]) == 4


@needs_gloo
def test_world_size_1_in_process(tmp_path, monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name in bench.MULTICAST_OFF_ENV:
        monkeypatch.delenv(name, raising=False)
    result = bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    assert not dist.is_initialized()
    _check_result(result, 1)
    assert json.loads((tmp_path / "context_parallel.json").read_text())["checks"] == result["checks"]
    assert all(t["comm_ms_per_rank"] == [0.0] for t in result["timings"] if "ms" in t)


@needs_gloo
@needs_bash
def test_torchrun_two_gloo_processes(tmp_path):
    env = {**os.environ, "SAGE_CP_NPROC": "2", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--quick", "--device", "cpu"], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "context_parallel" / "context_parallel.json").read_text())
    _check_result(result, 2)
    assert all(r[n]["inherited"] == v for r in result["meta"]["multicast_env_per_rank"]
               for n, v in bench.MULTICAST_OFF_ENV.items())  # from the launcher, in every rank
    assert "sage/sdpa" in proc.stdout
