"""The built module asks for no glibc/libstdc++ symbol version newer than manylinux_2_28 allows.

PyTorch's wheels are manylinux_2_28; a sage_core wheel that needs more cannot go wherever torch
goes. compat/manylinux.cmake makes a build on a newer system (glibc >= 2.34, GCC >= 11) meet it;
this test reads the ELF version references of the module that was built (the same data
``auditwheel show`` reads), so a new symbol of cudart or of our code that breaks it fails here,
in every CI run, not only when a release wheel is repaired.
"""

import pathlib
import platform
import struct
import sys

import pytest

import sage_core

#: manylinux_2_28 (AlmaLinux 8: glibc 2.28, GCC 8's libstdc++), from auditwheel's policy.
MAX_VERSIONS = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 24), "CXXABI": (1, 3, 11), "GCC": (7, 0, 0)}
#: What the module may link against: system libraries every manylinux_2_28 system has.
ALLOWED_NEEDED = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
                  "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2"}

_SHT_DYNAMIC, _SHT_GNU_VERNEED, _DT_NEEDED = 6, 0x6FFFFFFE, 1


def _elf_needs(path: pathlib.Path) -> tuple[list[str], dict[str, set[str]]]:
    """(DT_NEEDED names, {library: version names referenced}) of a little-endian ELF64 file."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not a little-endian ELF64 file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def string(strtab_index: int, offset: int) -> str:
        start = sections[strtab_index][4] + offset
        return data[start:data.index(b"\0", start)].decode()

    needed, versions = [], {}
    for _, sh_type, _, _, off, size, link, info, _, entsize in sections:
        if sh_type == _SHT_DYNAMIC:
            for pos in range(off, off + size, entsize):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == _DT_NEEDED:
                    needed.append(string(link, val))
        elif sh_type == _SHT_GNU_VERNEED:
            pos = off
            for _ in range(info):  # info = number of Elf64_Verneed entries
                _, cnt, file_off, aux, nxt = struct.unpack_from("<HHIII", data, pos)
                names = versions.setdefault(string(link, file_off), set())
                apos = pos + aux
                for _ in range(cnt):
                    _, _, _, name_off, anext = struct.unpack_from("<IHHII", data, apos)
                    names.add(string(link, name_off))
                    apos += anext
                pos += nxt
    return needed, versions


def _too_new(name: str) -> bool:
    family, _, number = name.partition("_")
    if family not in MAX_VERSIONS or not number[0].isdigit():
        return False  # e.g. GLIBC_PRIVATE never appears; CXXABI_TM_1 / GCC_* names without numbers
    return tuple(int(x) for x in number.split(".")) > MAX_VERSIONS[family]


def _host_glibc() -> tuple[int, ...]:
    lib, ver = platform.libc_ver()
    return tuple(int(x) for x in ver.split(".")) if lib == "glibc" and ver else ()


#: Newest build-host glibc that compat/manylinux.cmake maps back to manylinux_2_28 (the CI and
#: wheel image: glibc 2.36, GCC 12). A module built on a newer host (the GPU machine: glibc 2.38+,
#: GCC 13 linking libstdc++ statically) is a development build and needs newer versions.
MAX_COMPAT_BUILD_GLIBC = (2, 36)


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="manylinux_2_28 symbol limits are checked for Linux x86_64 builds")
@pytest.mark.skipif(_host_glibc() > MAX_COMPAT_BUILD_GLIBC,
                    reason=f"built on glibc {'.'.join(map(str, _host_glibc()))}, newer than the "
                           f"{'.'.join(map(str, MAX_COMPAT_BUILD_GLIBC))} that compat/manylinux.cmake maps to "
                           f"manylinux_2_28: a development build, not a release wheel")
def test_module_symbol_versions_fit_manylinux_2_28():
    so = pathlib.Path(sage_core._C.__file__)
    needed, versions = _elf_needs(so)
    assert "libc.so.6" in needed and "libc.so.6" in versions, (needed, versions)  # the parser sees them
    assert set(needed) <= ALLOWED_NEEDED, f"{so.name} needs libraries outside manylinux_2_28: " \
                                          f"{sorted(set(needed) - ALLOWED_NEEDED)}"
    too_new = {lib: sorted(v for v in names if _too_new(v)) for lib, names in versions.items()}
    too_new = {lib: names for lib, names in too_new.items() if names}
    assert not too_new, (
        f"{so.name} references symbol versions newer than manylinux_2_28 allows: {too_new}. "
        f"A symbol moved into libc at GLIBC_2.34 needs a line in packages/sage-core/compat/manylinux.cmake; "
        f"`objdump -T {so} | grep <version>` names the symbols (docs/packaging.md)")
