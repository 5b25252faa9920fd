"""qcompile's import raises glibc's mmap/trim thresholds (qcompile/malloc.py), unless opted out."""
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
import qcompile
from qcompile import malloc
# after the import, a freed 8 MiB block is reused: allocate, free, allocate again -> same address
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
a = libc.malloc(8 << 20); libc.free(a); b = libc.malloc(8 << 20)
print(malloc._done, a == b)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("opt_out", [False, True])
def test_import_keeps_freed_memory_unless_opted_out(opt_out):
    import os

    env = {**os.environ, "QCOMPILE_KEEP_FREED_MEMORY": "0" if opt_out else "1"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    done, reused = out.stdout.split()
    assert done == str(not opt_out)
    if not opt_out:
        assert reused == "True"
