"""Running Triton kernels under TRITON_INTERPRET=1 on CPU, for the kernel test files.

The interpreter must be switched on before triton is imported, so each test file re-runs itself as
child processes (one per group of sections, in parallel), each printing one JSON line per case:
{"case": name, "ok": bool, ...}. `run_children` collects them; `check` asserts on a prefix.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest


def run_children(test_file: str, child_parts: list[list[str]], timeout: float = 600) -> dict[str, dict]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        procs = [subprocess.Popen([sys.executable, os.path.abspath(test_file), *parts], env=env, cwd=root,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for parts in child_parts]
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    cases = {}
    for proc, (stdout, stderr) in zip(procs, outputs):
        if proc.returncode:
            pytest.fail(f"interpreter child process failed:\n{stderr[-4000:]}")
        for line in stdout.splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                cases[record.pop("case")] = record
    return cases


def check(results: dict[str, dict], prefix: str, minimum: int) -> None:
    """At least `minimum` cases named `prefix*` ran, and every one was within tolerance."""
    cases = {k: v for k, v in results.items() if k.startswith(prefix)}
    assert len(cases) >= minimum, f"expected >= {minimum} '{prefix}' cases, got {sorted(cases)}"
    bad = {k: v for k, v in cases.items() if not v["ok"]}
    assert not bad, f"{len(bad)}/{len(cases)} cases out of tolerance: {bad}"
