"""tools/sass_report.py: its SASS/ptxas parsing on a fixed listing (CPU, always), and the sm80
family's Blackwell cubins where nvcc and nvdisasm exist (skipped otherwise, with the reason):
native tensor-core instructions where docs/perf/sm80_family_blackwell.md says so, no spill, no trap."""

import importlib.util
import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_report", ROOT / "tools" / "sass_report.py")
sass_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_report)

KERNEL = ("_ZN4sage4sm806detail20sm80_attn_fwd_kernelINS1_19Sm80AttnFwdMainloopINS0_16RecipeQkS8PvE4m3"
          "ELi128E6__halfEEEEvNS0_17Sm80AttnFwdParamsE")
LISTING = f"""\t.target\tsm_120a
\t//----- nvinfo : EIATTR_REGCOUNT
\t.align\t\t4
        /*0000*/ \t.byte\t0x04, 0x2f
        /*0002*/ \t.short\t(.L_2 - .L_1)
\t.align\t\t4
.L_1:
        /*0004*/ \t.word\tindex@({KERNEL})
        /*0008*/ \t.word\t0x000000b1
\t.section\t.text.{KERNEL},"ax",@progbits
        /*0100*/                   IMMA.16832.S8.S8 R16, R4, R8, RZ ;
        /*0110*/               @P0 QMMA.16832.F32.E4M3.E4M3 R20, R4, R8, R20 ;
        /*0120*/                   QMMA.16832.F32.E4M3.E4M3 R24, R4, R8, R24 ;
        /*0130*/                   STL [R1], R4 ;
        /*0140*/                   CALL.REL.NOINC `($__internal_1_$__cuda_sm_9x_mma_sub_byte_internal_m16n8k64_s4_s4) ;
        /*0150*/                   BPT.TRAP 0x1 ;
        /*0160*/                   EXIT ;
"""


def test_listing_is_parsed():
    kernels = sass_report.sass_summary(LISTING)
    k = kernels[KERNEL]
    assert k["ops"] == {"IMMA.16832.S8.S8": 1, "QMMA.16832.F32.E4M3.E4M3": 2, "BPT.TRAP": 1}
    assert k["local"] == 1
    assert k["calls"] == {"__cuda_sm_9x_mma_sub_byte_internal_m16n8k64_s4_s4"}
    assert sass_report.eiattr_regcounts(LISTING) == {KERNEL: 0xb1}
    assert sass_report.short_name(KERNEL) == "QkS8PvE4m3_d128_f16"
    assert sass_report.short_name("_ZN4sage5quant17block_mean_kernelI13__nv_bfloat16EEvNS0_10MeanParamsEib") \
        == "block_mean_kernel_bf16"
    rows = [{"tu": "attn_sm80_qk_s8_pv_e4m3_hdim128_f16", "arch": "120a", "kernels": kernels}]
    problems = sass_report.check(rows, ["qk_s8_pv_e4m3@120a=QMMA", "qk_s8_pv_e4m3@120a=HMMA"])
    assert any("spills" in p for p in problems)
    assert any("trap" in p for p in problems)
    assert any("has no HMMA" in p for p in problems)
    assert not any("has no QMMA" in p for p in problems)


def test_ptxas_report_is_parsed():
    text = (f"ptxas info    : Compiling entry function '{KERNEL}' for 'sm_120a'\n"
            f"ptxas info    : Function properties for {KERNEL}\n"
            "    8 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
            "ptxas info    : Used 177 registers, used 1 barriers\n")
    m = sass_report._PTXAS_ENTRY.search(text)
    assert m and m.group(1) == KERNEL and (m.group(4), m.group(5), m.group(6)) == ("8", "12", "177")


def test_family_sources_are_the_instantiation_list():
    tus = sass_report.family_sources("sm80")
    assert len(tus) == 24 and all(src.exists() for _, src in tus)


def _tools():
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    nvdisasm = os.environ.get("SAGE_NVDISASM") or shutil.which("nvdisasm")
    if not pathlib.Path(nvcc).exists():
        pytest.skip(f"no nvcc ({nvcc})")
    if not nvdisasm:
        pytest.skip("no nvdisasm (set SAGE_NVDISASM, e.g. the nvidia-cuda-nvdisasm wheel's binary)")
    pytest.importorskip("cutlass_library")
    return nvcc, nvdisasm


def test_sm80_family_blackwell_sass(capsys):
    """One TU per P.V kind (f16, e4m3) for B200 and RTX 50: ~10 s of nvcc on two cores."""
    nvcc, nvdisasm = _tools()
    rc = sass_report.main(["--nvcc", nvcc, "--nvdisasm", nvdisasm, "--archs", "100a", "120a",
                           "--tu", "qk_s8_pv_f16_hdim64_bf16", "qk_s8_pv_e4m3_hdim128_f16", "--check",
                           "--expect", "qk_s8_pv_f16@100a=IMMA", "--expect", "qk_s8_pv_f16@100a=HMMA",
                           "--expect", "qk_s8_pv_e4m3@120a=QMMA", "--expect", "qk_s8_pv_e4m3@120a=IMMA"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "QMMA.16832.F32.E4M3.E4M3" in out.out


def test_sm120_nvfp4_sass(capsys):
    """The sm120 NVFP4 attention (issue 13): the 120a cubin holds the block-scaled FP4 mma.sync
    (OMMA.SF ... E2M1.E2M1.UE4M3.4X), no trap, no spill; two TUs, ~4 s of nvcc."""
    nvcc, nvdisasm = _tools()
    rc = sass_report.main(["--nvcc", nvcc, "--nvdisasm", nvdisasm, "--family", "sm120", "--archs", "120a",
                           "--tu", "qk_nvfp4_pv_nvfp4_hdim64_f16", "qk_nvfp4_pv_nvfp4_hdim128_bf16", "--check",
                           "--expect", "qk_nvfp4_pv_nvfp4@120a=OMMA"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "OMMA.SF.16864.F32.E2M1.E2M1.UE4M3.4X" in out.out
