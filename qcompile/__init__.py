"""qcompile: run quantized LLMs through torch.compile.

    import qcompile
    model = torch.compile(model, backend=qcompile)              # default recipe
    model = torch.compile(model, backend=qcompile.backend(qcompile.RTNConfig(group_size=128)))
    qcompile.quantize(model)                                     # quantize ahead of time, in place
    qcompile.quantize(model, qcompile.GPTQConfig(bits=3), calibration=texts, tokenizer=tok)  # GPTQ
    qcompile.quantize(model, qcompile.QUIKConfig(), calibration=texts, tokenizer=tok)  # W4A4 + outliers
    qcompile.quantize(model, qcompile.DLQATConfig(bits=3), calibration=texts, tokenizer=tok)  # low-rank QAT
    qcompile.save(model, "out/"); qcompile.load(model, "out/")  # safetensors + JSON
    print(qcompile.explain(model, input_ids))                    # what the compiler did, and why
    qcompile.parallelize(model)                                  # tensor parallel (torch.distributed)
    qcompile.load(skeleton, "out/", parallel=True)               # ... reading only this rank's shard
"""
import os as _os
import sys as _sys
import types as _types

# Run from a source checkout (PYTHONPATH=.), `passes/` and `lowering/` sit beside this package; the
# installed package maps them to qcompile.passes / qcompile.lowering. Make both work the same.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "lowering", "__init__.py")) and _root not in __path__:
    __path__.append(_root)

from .malloc import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()  # reuse freed CPU memory instead of faulting it in again (qcompile/malloc.py)
from . import ops  # noqa: E402  (registers torch.ops.qcompile.*)
from . import lowering  # noqa: E402  (registers kernels)
from ._compat import route_generate_through_compiled_forward as _route_generate  # noqa: E402
from .backend import DEFAULT as _DEFAULT_BACKEND, Backend, backend  # noqa: E402
from .config import AttentionConfig, DLQATConfig, GANQConfig, GPTQConfig, QuantConfig, QUIKConfig, RTNConfig, default_config  # noqa: E402
from .explain import explain  # noqa: E402
from .methods.gqa import GQAConfig, convert_to_gqa  # noqa: E402
from .quantize import quantize  # noqa: E402
from .errors import CheckpointError  # noqa: E402
from .report import Report  # noqa: E402
from .formats.checkpoint import load, save  # noqa: E402
from .parallel import parallelize  # noqa: E402
from . import qat  # noqa: E402

__all__ = ["backend", "Backend", "quantize", "save", "load", "explain", "parallelize", "Report", "CheckpointError",
           "QuantConfig", "RTNConfig", "GPTQConfig", "DLQATConfig", "qat", "GANQConfig", "QUIKConfig", "default_config", "AttentionConfig", "GQAConfig",
           "convert_to_gqa"]
__version__ = "0.1.0"

_route_generate()


class _QCompileModule(_types.ModuleType):
    """Lets the module itself be a torch.compile backend: torch.compile(model, backend=qcompile)."""

    _qcompile_backend = True

    def __call__(self, gm, example_inputs, **kwargs):
        return _DEFAULT_BACKEND(gm, example_inputs, **kwargs)


_sys.modules[__name__].__class__ = _QCompileModule
