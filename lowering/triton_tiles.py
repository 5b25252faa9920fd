"""What the quantized-matmul Triton kernels share: the tile order, and split-K for decode.

Decode (M <= 16) is memory-bound, and N / BLOCK_N output tiles are too few programs to keep enough
bytes in flight, so decode configs split K over several programs per tile. Each stores its fp32
partial tile and takes a ticket; the last one to arrive sums the partials in split order
(deterministic: the same bits every run) and writes the output. One launch, no zero-fill, no cast
kernel, no host sync: CUDA graphs capture it. The tickets are int32 counters in a small buffer per
(device, stream) that the kernel returns to zero.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

DEFAULT_NUM_SMS = 132  # H100 SXM; used where no CUDA device can be asked (the interpreter)
DEFAULT_SHARED_MEMORY = 232448  # H100's per-block limit, likewise
MAX_SPLIT_K = 16


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid`, launched GROUP_M row-blocks at a time per column-block so
    those programs share each weight tile while it is in L2 (Triton's matmul tutorial order)."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % rows), (pid % width) // rows


@triton.jit
def split_k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """[k_lo, k_hi) of this program's split (program_id(1)): whole BLOCK_K steps, none empty
    (`split_k_for` chooses SPLIT_K so)."""
    k_per = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = tl.program_id(1) * k_per
    return k_lo, tl.minimum(k_lo + k_per, K)


@triton.jit
def store_split_k(acc, out_ptr, partials_ptr, tickets_ptr, rm, rn, M, N, stride_om, SPLIT_K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store this program's fp32 tile: straight to the output without split-K; otherwise as a
    partial, and the last split of the tile (ticket program_id(0)) sums them and stores."""
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ticket_ptr = tickets_ptr + tl.program_id(0)
        tile = rm[:, None] * N + rn[None, :]
        tl.store(partials_ptr + tl.program_id(1) * M * N + tile, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:  # the last split of this tile: sum the partials in split order
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, SPLIT_K):  # .cg: read L2, where the other SMs' stores are
                acc += tl.load(partials_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch


def split_k_for(tiles: int, k: int, block_k: int, num_sms: int) -> int:
    """How many programs share one output tile: enough for ~4 programs per SM (as many as the
    decode tiles' registers allow), while every split keeps at least two BLOCK_K steps (the loads
    of one overlap the math of the other) and none is left empty."""
    steps = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(4 * num_sms, tiles), MAX_SPLIT_K, steps // 2))
    return triton.cdiv(steps, triton.cdiv(steps, split))


@functools.cache
def device_limits(device: torch.device) -> dict:
    """The SM count and per-block shared memory the config heuristics plan for on `device`."""
    if device.type != "cuda":
        return {"num_sms": DEFAULT_NUM_SMS, "shared_memory": DEFAULT_SHARED_MEMORY}
    props = torch.cuda.get_device_properties(device)
    return {"num_sms": props.multi_processor_count,
            "shared_memory": getattr(props, "shared_memory_per_block_optin", DEFAULT_SHARED_MEMORY)}


# Split-K tickets: int32 counters, zero between launches (the last split of a tile resets its own).
# One buffer per (device, stream), so that kernels on two streams never share a counter (kernels on
# one stream run one after another, so int4 and LUT share it); buffers are never freed, since a CUDA
# graph may have captured their address.
tickets: dict[tuple, Tensor] = {}
_retired_tickets: list[Tensor] = []


def ticket_buffer(device: torch.device, count: int) -> Tensor:
    """At least `count` zeroed tickets for kernels launched on the current stream of `device`."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = tickets.get(key)
    if buf is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A CUDA graph captures on a side stream and replays on the caller's: take the buffer the
        # eager warm-up used rather than allocate one inside the capture.
        buf = next((b for (d, _), b in tickets.items() if d == device and b.numel() >= count), None)
        if buf is not None:
            return buf
    if buf is None or buf.numel() < count:
        if buf is not None:
            _retired_tickets.append(buf)
        buf = tickets[key] = torch.zeros(max(4096, triton.next_power_of_2(count)), dtype=torch.int32, device=device)
    return buf


def split_k_buffers(x2: Tensor, m: int, n: int, split: int, tiles: int) -> tuple[Tensor, Tensor]:
    """(fp32 partials for `split` splits of an [m, n] output, tickets for `tiles` tiles)."""
    if split > 1 and split * m * n >= 2**31:  # the kernels index the partials with int32
        raise ValueError(f"split-K {split} over a [{m}, {n}] output needs 64-bit indexing")
    partials = x2.new_empty(split * m * n if split > 1 else 1, dtype=torch.float32)
    return partials, ticket_buffer(x2.device, tiles)
