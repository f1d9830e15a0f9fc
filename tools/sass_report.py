"""Registers, spills and MMA instructions per kernel, from nvcc's -Xptxas -v and the SASS.

Two sources:
  compile (default): each translation unit of a family in packages/sage-core/cmake/instantiations.cmake
      compiled alone to a cubin per arch (nvcc -cubin -Xptxas -v, the build's flags), then
      disassembled. This is what docs/perf/sm80_family_blackwell.md records.
  --module _C.so: the cubins inside a built sage_core module (what a wheel ships), disassembled;
      registers from the cubin's EIATTR_REGCOUNT, spills as local-memory instructions (STL/LDL).

    python tools/sass_report.py --family sm80 --archs 100a 120a [--tu qk_s8_pv_e4m3_hdim128_f16] [--check]
    python tools/sass_report.py --module build/.../_C.cpython-311-x86_64-linux-gnu.so --check

--check exits 1 if a kernel spills or holds a trap instruction (BPT, BRK: what a wrong-arch guard
compiles to), or if an --expect rule fails: --expect 'qk_s8_pv_e4m3@120a=QMMA' (every kernel whose
TU name or short kernel name, e.g. QkS8PvE4m3_d128_f16, contains the text holds that instruction on
that arch). nvdisasm: --nvdisasm, else
$SAGE_NVDISASM, else PATH, else next to nvcc (there is no cuobjdump on the CPU machines; the
nvidia-cuda-nvdisasm wheel's binary works).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTANTIATIONS = ROOT / "packages" / "sage-core" / "cmake" / "instantiations.cmake"
#: Tensor-core instruction mnemonics (mma.sync: IMMA/HMMA/QMMA/OMMA; wgmma: *GMMA; tcgen05: UTC*)
MMA_OPS = ("IMMA", "HMMA", "QMMA", "OMMA", "IGMMA", "HGMMA", "QGMMA", "OGMMA",
           "UTCIMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA")
TRAP_OPS = ("BPT", "BRK")
EM_CUDA = 190
_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_FUNC = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\S+)' for '(\S+)'\n(?:.*\n)*?"
    r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r"(?:.*\n)*?ptxas info\s+: Used (\d+) registers")


def family_sources(family: str) -> list[tuple[str, pathlib.Path]]:
    """(kernel name, .cu path) of every sage_instantiation(<family> ...) line."""
    text = INSTANTIATIONS.read_text()
    rows = re.findall(rf"^sage_instantiation\({family}\s+(\S+)\s+(\S+)\)", text, re.M)
    return [(name, ROOT / "kernels" / "src" / src) for name, src in rows]


def find_tool(name: str, given: str | None, env: str) -> str:
    for cand in (given, os.environ.get(env), shutil.which(name)):
        if cand:
            return cand
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    sibling = pathlib.Path(nvcc).parent / name
    if sibling.exists():
        return str(sibling)
    sys.exit(f"{name} not found: pass --{name}, set ${env} or put it on PATH")


def sass_summary(sass: str) -> dict[str, dict]:
    """kernel (mangled) -> {"ops": Counter of mnemonic+modifiers for MMA/trap ops, "local": STL/LDL count}."""
    out: dict[str, dict] = {}
    current = None
    for line in sass.splitlines():
        m = _FUNC.match(line)
        if m:
            current = out.setdefault(m.group(1), {"ops": collections.Counter(), "local": 0, "calls": set()})
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        op, mods = m.group(1), m.group(2)
        if op in MMA_OPS or op in TRAP_OPS:
            current["ops"][op + mods] += 1
        elif op in ("STL", "LDL"):
            current["local"] += 1
        elif op == "CALL" and "mma" in line:  # an MMA the hardware lacks, emulated by a subroutine
            current["calls"].add(re.search(r"\(\$?([^)]*)\)", line).group(1).split("$")[-1])
    return {k: v for k, v in out.items() if not k.startswith("$")}


def compile_one(nvcc: str, nvdisasm: str, cutlass: str, family: str, name: str, src: pathlib.Path,
                arch: str, workdir: pathlib.Path) -> dict:
    cubin = workdir / f"{name}.sm_{arch}.cubin"
    cmd = [nvcc, "-O3", "-DNDEBUG", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v",
           "--expt-relaxed-constexpr", f"-DSAGE_WITH_{family.upper()}=1", f"-I{ROOT / 'kernels' / 'include'}",
           "-isystem", cutlass, str(src), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {name} sm_{arch}:\n{res.stderr[-4000:]}")
    ptxas = {m.group(1): dict(regs=int(m.group(6)), stack=int(m.group(3)), spill_st=int(m.group(4)),
                              spill_ld=int(m.group(5))) for m in _PTXAS_ENTRY.finditer(res.stderr)}
    sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, check=True).stdout
    kernels = sass_summary(sass)
    for fn, info in kernels.items():
        info.update(ptxas.get(fn, {}))
    return {"tu": name, "arch": arch, "kernels": kernels}


def module_cubins(path: pathlib.Path) -> list[bytes]:
    """Every uncompressed CUDA ELF (cubin) embedded in a host shared object's fatbins."""
    data = path.read_bytes()
    out = []
    for m in re.finditer(rb"\x7fELF\x02\x01\x01", data):
        o = m.start()
        if o == 0 or struct.unpack_from("<H", data, o + 18)[0] != EM_CUDA:
            continue
        phoff, shoff = struct.unpack_from("<QQ", data, o + 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, o + 54)
        end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)  # cubins end with the phdrs
        for i in range(shnum):
            sh = o + shoff + i * shentsize
            s_off, s_size = struct.unpack_from("<QQ", data, sh + 24)
            s_type, = struct.unpack_from("<I", data, sh + 4)
            end = max(end, s_off + (0 if s_type == 8 else s_size))  # 8 = SHT_NOBITS
        out.append(data[o:o + end])
    return out


def eiattr_regcounts(sass: str) -> dict[str, int]:
    """kernel -> registers, from nvdisasm's listing of .nv.info's EIATTR_REGCOUNT records."""
    regs = {}
    for m in re.finditer(r"EIATTR_REGCOUNT\n(?:.*\n){1,8}?\s+/\*[0-9a-f]+\*/\s+\.word\s+index@\((\S+)\)\n"
                         r"\s+/\*[0-9a-f]+\*/\s+\.word\s+(0x[0-9a-f]+)", sass):
        regs[m.group(1)] = int(m.group(2), 16)
    return regs


def from_module(nvdisasm: str, path: pathlib.Path, workdir: pathlib.Path) -> list[dict]:
    rows = []
    for i, blob in enumerate(module_cubins(path)):
        cubin = workdir / f"m{i}.cubin"
        cubin.write_bytes(blob)
        sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, check=True).stdout
        arch = re.search(r"\.target\s+sm_(\w+)", sass).group(1)
        kernels = sass_summary(sass)
        regs = eiattr_regcounts(sass)
        for fn, info in kernels.items():
            info["regs"] = regs.get(fn)
        rows.append({"tu": "", "arch": arch, "kernels": kernels})  # a module has no TU names
    return rows


def short_name(mangled: str) -> str:
    """A readable name for a mangled kernel: the sm80 mainloop's recipe, head dim and io type, or
    the kernel's own name with its io type (the quant kernels)."""
    io = "_bf16" if "bfloat16" in mangled else "_f16" if "__half" in mangled else ""
    m = re.search(r"Recipe(\w+?)ELi(\d+)E", mangled)
    if m:
        return f"{m.group(1)}_d{m.group(2)}{io}"
    names, pos = [], mangled.find("N") + 1 if mangled.startswith("_ZN") else 2
    while pos < len(mangled) and mangled[pos].isdigit():  # <length><identifier> components
        n = re.match(r"\d+", mangled[pos:]).group(0)
        names.append(mangled[pos + len(n):pos + len(n) + int(n)])
        pos += len(n) + int(n)
    return (names[-1] if names else mangled[:40]) + io


def table(rows: list[dict]) -> str:
    lines = ["| arch | TU / kernel | regs | spill st/ld B | MMA instructions | emulated MMA calls | traps |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["tu"])):
        for fn, k in sorted(r["kernels"].items()):
            mma = ", ".join(f"{op} x{n}" for op, n in sorted(k["ops"].items()) if op.split(".")[0] in MMA_OPS)
            traps = ", ".join(f"{op} x{n}" for op, n in k["ops"].items() if op.split(".")[0] in TRAP_OPS)
            spill = (f"{k['spill_st']}/{k['spill_ld']}" if "spill_st" in k
                     else f"{k['local']} STL/LDL" if k["local"] else "0")
            label = (r["tu"] if len(r["kernels"]) == 1 else f"{r['tu']}: {short_name(fn)}") if r["tu"] \
                else short_name(fn)
            lines.append(f"| {r['arch']} | {label} | {k.get('regs', '?')} | {spill} | {mma or '-'} | "
                         f"{', '.join(sorted(k['calls'])) or '-'} | {traps or '-'} |")
    return "\n".join(lines)


def pivot(rows: list[dict]) -> str:
    """One row per TU, one column per arch: registers (and spilled bytes st/ld when not 0)."""
    archs = sorted({r["arch"] for r in rows}, key=lambda a: int(a.rstrip("af")))
    cells: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for r in rows:
        for fn, k in r["kernels"].items():
            label = r["tu"] or short_name(fn)
            st, ld = k.get("spill_st", 0), k.get("spill_ld", 0)
            cells[label][r["arch"]] = f"{k.get('regs', '?')}" + (f" (spills {st}/{ld} B)" if st or ld else "")
    lines = ["| TU | " + " | ".join(f"sm_{a}" for a in archs) + " |", "|---|" + "---|" * len(archs)]
    for label in sorted(cells):
        lines.append(f"| {label} | " + " | ".join(cells[label].get(a, "-") for a in archs) + " |")
    return "\n".join(lines)


def check(rows: list[dict], expects: list[str]) -> list[str]:
    problems = []
    for r in rows:
        for fn, k in r["kernels"].items():
            where = f"sm_{r['arch']} {r['tu'] or short_name(fn)}"
            if k.get("spill_st") or k.get("spill_ld") or k["local"]:
                problems.append(f"{where}: spills ({k.get('spill_st', '?')}/{k.get('spill_ld', '?')} B, "
                                f"{k['local']} local-memory instructions)")
            traps = [op for op in k["ops"] if op.split(".")[0] in TRAP_OPS]
            if traps:
                problems.append(f"{where}: trap instructions {traps}")
    for rule in expects:
        m = re.fullmatch(r"(.+)@(\w+)=(\w+)", rule)
        if not m:
            sys.exit(f"--expect {rule!r}: want TEXT@ARCH=INSTRUCTION, e.g. qk_s8_pv_e4m3@120a=QMMA")
        text, arch, instr = m.groups()
        matched = [(r, fn, k) for r in rows if r["arch"] == arch for fn, k in r["kernels"].items()
                   if text in r["tu"] or text in short_name(fn)]
        if not matched:
            problems.append(f"--expect {rule}: no kernel matches")
        for r, fn, k in matched:
            if not any(op.split(".")[0] == instr for op in k["ops"]):
                problems.append(f"--expect {rule}: {r['tu'] or short_name(fn)} on sm_{arch} has no {instr}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="sm80", help="instantiations.cmake family (compile mode)")
    p.add_argument("--archs", nargs="+", default=["100a", "103a", "120a", "121a"])
    p.add_argument("--tu", nargs="*", default=None, help="only TUs whose name contains one of these")
    p.add_argument("--module", type=pathlib.Path, help="report the cubins of a built sage_core _C module")
    p.add_argument("--nvcc", default=None)
    p.add_argument("--nvdisasm", default=None)
    p.add_argument("-j", "--jobs", type=int, default=2)
    p.add_argument("--pivot", action="store_true", help="registers per TU (rows) and arch (columns)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--expect", action="append", default=[])
    args = p.parse_args(argv)
    nvdisasm = find_tool("nvdisasm", args.nvdisasm, "SAGE_NVDISASM")
    with tempfile.TemporaryDirectory(prefix="sage-sass-") as tmp:
        work = pathlib.Path(tmp)
        if args.module:
            rows = from_module(nvdisasm, args.module, work)
        else:
            nvcc = args.nvcc or os.environ.get("CUDACXX") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
            import cutlass_library  # the pinned nvidia-cutlass wheel's headers, as the build uses
            cutlass = str(pathlib.Path(cutlass_library.source_path) / "include")
            tus = [(n, s) for n, s in family_sources(args.family)
                   if not args.tu or any(t in n for t in args.tu)]
            if not tus:
                sys.exit(f"no translation unit of family {args.family!r} matches {args.tu}")
            with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futs = [pool.submit(compile_one, nvcc, nvdisasm, cutlass, args.family, n, s, a, work)
                        for n, s in tus for a in args.archs]
                rows = [f.result() for f in futs]
    print(pivot(rows) if args.pivot else table(rows))
    if args.check:
        problems = check(rows, args.expect)
        for line in problems:
            print("CHECK FAILED:", line, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
