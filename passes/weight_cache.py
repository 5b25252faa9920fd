"""Quantized weights kept on disk across processes, keyed by what made them.

The backend quantizes a model's float weights while it compiles (SmolLM2's default recipe: ~13 s
of a ~28 s first token with Inductor's caches warm). A later process compiling the same weights
with the same recipe and qcompile reads them back instead (`WeightStore` in context.py asks here
first, `made_or_loaded`). Key: a digest of the weights' bytes, every input of the quantization (config, plans,
device, norm gains), qcompile's source and torch's version. Files live under
$QCOMPILE_CACHE/weights (default ~/.cache/qcompile/weights). Beyond QCOMPILE_WEIGHT_CACHE_GB (default
2) the least recently used files of earlier processes go; what this process reads or writes stays
(a model larger than the limit would otherwise evict its own layers). QCOMPILE_WEIGHT_CACHE=0 turns
the cache off. CPU models only: on a GPU, hashing the weights would mean copying them out.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch

from qcompile.ops import PackedLinear

_FORMAT = 1  # bump when the file layout changes
_STARTED = time.time()  # files used since then belong to this process and are never trimmed


def enabled(device: torch.device) -> bool:
    return device.type == "cpu" and os.environ.get("QCOMPILE_WEIGHT_CACHE", "1") != "0"


def made_or_loaded(make, describe, device: torch.device) -> PackedLinear:
    """The packed weight `make()` returns, read from disk when an earlier process stored it.
    `describe()`: (description, tensors) that determine it, asked only when the cache is used."""
    if not enabled(device):
        return make()
    key = digest(*describe())
    packed = load(key, device)
    if packed is None:
        packed = make()
        save(key, packed)
    return packed


def directory() -> Path:
    from qcompile.tools.models import cache_dir

    return cache_dir() / "weights"


@functools.cache
def _source_digest() -> str:
    import qcompile
    import qcompile.lowering
    import qcompile.passes
    from qcompile import _compat

    files = [str(f) for pkg in (qcompile, qcompile.lowering, qcompile.passes)
             for f in Path(pkg.__file__).parent.rglob("*.py")]
    files += [str(f) for f in Path(qcompile.lowering.__file__).parent.glob("*.cpp")]
    return _compat.digest_files(files)


def digest(description: str, tensors: list[torch.Tensor]) -> str:
    """A key for the packed weight made from `tensors` as `description` says."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{_FORMAT}|{torch.__version__}|{_source_digest()}|{description}".encode())
    for t in tensors:
        t = t.detach()
        h.update(f"|{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load(key: str, device: torch.device) -> PackedLinear | None:
    """The packed weight stored under `key`, or None (absent, unreadable: then it is made again)."""
    path = directory() / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt", device=str(device)) as f:
            info = json.loads(f.metadata()["qcompile"])
            tensors = {name: f.get_tensor(name) for name in info["tensors"]}
            perm = f.get_tensor("perm") if info["perm"] else None
        os.utime(path)  # recently used: kept longest
        return PackedLinear(info["layout"], tensors, tuple(info["consts"]), info["in_features"],
                            info["out_features"], info["meta"], perm, info["cpu_activations"])
    except Exception as e:  # a damaged or foreign file: make the weight again
        warnings.warn(f"qcompile: ignoring the cached quantized weight {path} ({type(e).__name__}: {e})",
                      stacklevel=3)
        return None


def save(key: str, packed: PackedLinear) -> None:
    """Store `packed` under `key` (written to a temporary file, then renamed: a killed process leaves no
    half file); the folder is trimmed to its size limit once, when this process exits."""
    from safetensors.torch import save_file

    info = dict(layout=packed.layout, tensors=list(packed.tensors), consts=list(packed.consts),
                in_features=packed.in_features, out_features=packed.out_features, meta=packed.meta,
                perm=packed.perm is not None, cpu_activations=packed.cpu_activations)
    try:
        text = json.dumps(info)
    except TypeError:
        return  # a format whose description is not plain data: not cached
    tensors = {n: t.detach().cpu().contiguous() for n, t in packed.tensors.items()}
    if packed.perm is not None:
        tensors["perm"] = packed.perm.detach().cpu().contiguous()
    out = directory()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{key}.{os.getpid()}.tmp"
        save_file(tensors, str(tmp), metadata={"qcompile": text})
        tmp.replace(out / f"{key}.safetensors")
        _trim_at_exit(out)
    except OSError as e:  # a read-only or full disk costs the next process time, nothing else
        warnings.warn(f"qcompile: could not cache a quantized weight in {out} ({e})", stacklevel=3)


@functools.cache  # one scan of the folder per process and folder, not one per file written
def _trim_at_exit(folder: Path) -> None:
    atexit.register(_trim, folder, float(os.environ.get("QCOMPILE_WEIGHT_CACHE_GB", "2")) * 2**30)


def _trim(folder: Path, limit: float) -> None:
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for f in files:
        total += f.stat().st_size
        if total > limit and f.stat().st_mtime < _STARTED:
            f.unlink(missing_ok=True)
