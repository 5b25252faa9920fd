"""A temporary torch thread count, for loops of many small ops (GPTQ's and GANQ's column loops)."""
from contextlib import contextmanager

import torch


@contextmanager
def threads(n: int):
    """Run the block with `n` intra-op threads. Per-column ops are too small to split, and a
    parallel region per op costs more than the op (milliseconds when other processes share the
    cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
