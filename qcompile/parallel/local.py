"""Run a function on T local ranks (gloo, one process each): for tests and benchmarks on one machine.

Real runs start ranks with `torchrun` (any number of nodes); this only stands in for it where a
test needs several ranks: a fresh file rendezvous per call, one thread per rank (ranks share the
machine's cores), bounded timeouts, and every rank's result (or its error) returned.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init: str, fn, args, results, timeout_s: float) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch._inductor.config as inductor_config
    inductor_config.compile_threads = 1  # compile workers per rank would oversubscribe the cores (and hang at exit)
    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        try:
            results.put((rank, "ok", fn(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report, do not hang the parent
        results.put((rank, "error", traceback.format_exc()))


def run_local_ranks(world: int, fn, *args, timeout_s: float = 600) -> list:
    """``fn(rank, world, *args)`` on `world` spawned processes in one gloo group; returns the results
    in rank order (they must pickle: prefer numpy arrays and plain values). Raises RuntimeError with
    the rank's traceback if one fails, TimeoutError if one does not finish in `timeout_s`."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(r, world, init, fn, args, results, timeout_s), daemon=True)
                 for r in range(world)]
        for p in procs:
            p.start()
        out: dict[int, object] = {}
        try:
            for _ in range(world):
                rank, status, value = results.get(timeout=timeout_s)
                if status == "error":
                    raise RuntimeError(f"rank {rank} of {world} failed:\n{value}")
                out[rank] = value
        except Exception as e:
            if type(e).__name__ == "Empty":
                raise TimeoutError(f"a rank of {world} did not finish in {timeout_s:.0f} s") from None
            raise
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        return [out[r] for r in range(world)]
