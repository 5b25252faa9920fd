"""Build (once per machine) and load the CPU kernels in cpu_kernels.cpp.

The kernels register themselves as the CPU implementation of qcompile::int4_mm_kernel and
qcompile::int8_mm_kernel, so the dispatcher calls them with no Python in between (a Python kernel
costs ~10-40 us a call, as much as a decode-size matmul on a small model).

The library is compiled with the system C++ compiler (``$CXX``, else ``c++``/``g++``) against the
running torch's headers the first time it is needed, as Inductor builds its own CPU kernels
(~10 s), and cached under $QCOMPILE_CACHE/kernels (default ~/.cache/qcompile/kernels), keyed by
the source, the flags, the torch version and this CPU's instruction sets. Without a compiler the
ops run their float reference (correct, slow) and a warning says so.

``load(isa)`` with isa "avx2" (no AVX-512, so no VNNI) or "scalar" (no AVX) builds the same source
for a lesser instruction set, a .so of its own, registered as ``torch.ops.qcompile_<isa>`` with the
schemas of the qcompile kernel ops: tests compare the variants on one machine.
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_suffix(".cpp")
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "scalar": ["-mno-avx"]}  # what -march=native loses
KERNEL_OPS = ("int4_mm_kernel", "int8_mm_kernel", "lut_mm_kernel", "int4_mm_a8_kernel", "int8_mm_a8_kernel",
              "int8_gemm", "quik_linear", "decode_attention_kernel")
_variant_libs: list = []  # the variant namespaces' op definitions, kept alive


def _cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile")) / "kernels"


def _cpu_signature() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() + platform.machine()


def _command(cxx: str, out: Path, isa: str = "native") -> list[str]:
    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    variant = [] if isa == "native" else [*ISA_FLAGS[isa], f"-DQCOMPILE_OPS=qcompile_{isa}"]
    return [cxx, "-O3", "-march=native", *variant, "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCE), "-o", str(out),
            f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10", "-lgomp"]


@functools.cache
def load(isa: str = "native") -> bool:
    """Build if needed and load the kernels; False (with a warning) if they cannot be built here."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"qcompile: unknown CPU kernel variant {isa!r}, expected one of {list(ISA_FLAGS)}")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        warnings.warn("qcompile: no C++ compiler found (set $CXX): quantized CPU ops run their slow "
                      "float reference", stacklevel=2)
        return False
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(_command(cxx, Path("x"), isa)).encode(),
                                      torch.__version__.encode(), _cpu_signature().encode()]))
    path = _cache_dir() / f"cpu_kernels-{'' if isa == 'native' else isa + '-'}{key.hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            result = subprocess.run(_command(cxx, out, isa), capture_output=True, text=True)
            if result.returncode != 0:
                warnings.warn("qcompile: building the CPU kernels failed; quantized CPU ops run their slow "
                              f"float reference.\n{' '.join(_command(cxx, out, isa))}\n{result.stderr[-3000:]}",
                              stacklevel=2)
                return False
            os.replace(out, path)  # atomic: concurrent builders race harmlessly
    if isa != "native":  # the variant's namespace, with the schemas of qcompile's kernel ops
        lib = torch.library.Library(f"qcompile_{isa}", "DEF")
        for name in KERNEL_OPS:
            lib.define(str(getattr(torch.ops.qcompile, name).default._schema).split("::", 1)[1])
        _variant_libs.append(lib)
    torch.ops.load_library(str(path))
    return True
