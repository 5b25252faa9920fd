"""Where the ops find their device kernels: `qcompile.lowering` registers a loader per device type
(CPU: build and load lowering/cpu_kernels.cpp), which an op calls before its first use."""
from __future__ import annotations

import torch

# device type -> loader of its compiled kernels (set by qcompile.lowering; called on first use)
KERNEL_LOADERS: dict = {}


def load_kernels(device: torch.device) -> bool:
    """Load `device`'s compiled kernels; True if they are there (False: the ops run their references)."""
    loader = KERNEL_LOADERS.get(device.type)
    return bool(loader is not None and loader())
