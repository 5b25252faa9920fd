"""Tensor parallelism on torch.distributed for quantized (and float) Llama-style models.

    dist.init_process_group()                  # torchrun --nproc-per-node T script.py (gloo or NCCL)
    model = qcompile.parallelize(model)        # this rank keeps its shard
    model = torch.compile(model, backend=qcompile)

Megatron-style: q/k/v and gate/up are column-parallel (this rank's heads / intermediate channels),
o_proj and down_proj row-parallel (this rank's input columns, then one all_reduce; the bias is
added once, after the sum). Embeddings, norms and lm_head are replicated (a small model's lm_head
is a large share of its weights, but a vocab-parallel head would add a third collective per token;
replicated, every rank computes identical logits and samples the same token).

act_order weights store their input columns in group order (`perm`). Column-parallel layers read
the whole input, so they keep their perm. Row-parallel ones, with ``tp_aware=True`` (default):
- down_proj: its perm is folded into gate/up's output rows offline (`qcompile.passes.tp_fold`),
  so each rank's slice of the activation already lines up with its columns: no collective, no
  runtime permute;
- o_proj (no exact fold: its input is laid out per head) and any MLP the fold cannot read, by
  ``act_order_rows``:
  "regroup" (default): this rank's columns are regrouped, each group's members on this rank as
  groups of their own that keep the group's scale (`qcompile.formats.slicing.regroup_columns`),
  read through one local index: no collective; the padding bytes and the index are in the report.
  "gather": all_gather the input, permute, take this rank's columns (one all_gather per layer).
  Both compute what one process computes, up to the order of float sums. With int8 activations
  (CPU decode, x quantized per weight group) "regroup" quantizes x over each rank's members of a
  group, a finer grid than one process's; "gather" keeps the grid. Neither is bit-identical to
  one process there: int8 rounding turns any change of summation order into a different code now
  and then (on SmolLM2, scaling one layer's output by 1 + 1e-7 moves the logits by ~3%), so
  greedy tokens match a single process exactly with float activations (``cpu_activations="float"``).
``tp_aware=False`` is the naive path, for measurement: no fold, and every act_order row-parallel
layer all-gathers its input, permutes it and takes its slice.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qcompile import lowering
from qcompile.formats import Int8Weight
from qcompile.formats.slicing import regroup_columns, regrouped_bytes, take_columns, take_rows
from qcompile.modules import QuantLinear, colocate_siblings

from .layers import RowParallelLinear

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
GATED_MLP = ("gate_proj", "up_proj", "down_proj")
MLP = ("up_proj", "down_proj")
_NAMES = {"attention": ATTENTION, "gated_mlp": GATED_MLP, "mlp": MLP}


@dataclass
class ShardReport:
    """One linear layer under tensor parallelism."""

    path: str
    style: str                 # "column", "row", "replicated"
    shape: tuple               # (out, in) of the whole layer
    local_shape: tuple         # (out, in) this rank computes
    bytes: int                 # whole layer's weight bytes (quantized as stored)
    local_bytes: int           # this rank's
    runtime_index: bool = False   # an index_select on the activation per call
    all_gather: bool = False      # the input is all-gathered first (naive act_order path)
    notes: list[str] = field(default_factory=list)


@dataclass
class ParallelReport:
    """What `parallelize` did on this rank (``model.qcompile_parallel``)."""

    world_size: int
    rank: int
    tp_aware: bool
    act_order_rows: str = "regroup"
    layers: list[ShardReport] = field(default_factory=list)
    folds: list = field(default_factory=list)   # qcompile.passes.tp_fold.FoldRecord

    def to_dict(self) -> dict:
        sharded = [x for x in self.layers if x.style != "replicated"]
        return {"world_size": self.world_size, "rank": self.rank, "tp_aware": self.tp_aware,
                "act_order_rows": self.act_order_rows,
                "layers": [asdict(x) for x in self.layers], "folds": [asdict(f) for f in self.folds],
                "sharded_bytes": sum(x.bytes for x in sharded),
                "local_sharded_bytes": sum(x.local_bytes for x in sharded),
                "replicated_bytes": sum(x.bytes for x in self.layers if x.style == "replicated"),
                "runtime_indexes": sum(x.runtime_index for x in self.layers),
                "all_gather_layers": sum(x.all_gather for x in self.layers)}

    def __str__(self) -> str:
        d = self.to_dict()
        lines = [f"tensor parallel: rank {self.rank} of {self.world_size}, tp_aware={self.tp_aware}; sharded "
                 f"linears {d['local_sharded_bytes'] / 2**20:.2f} of {d['sharded_bytes'] / 2**20:.2f} MiB here "
                 f"({d['local_sharded_bytes'] / max(d['sharded_bytes'], 1):.3f}x, ideal {1 / self.world_size:.3f}x), "
                 f"replicated {d['replicated_bytes'] / 2**20:.2f} MiB; {d['runtime_indexes']} runtime index(es), "
                 f"{d['all_gather_layers']} all-gathered input(s)"]
        width = max([len(x.path) for x in self.layers] + [5])
        lines.append(f"{'layer':<{width}}  {'style':<10}  {'shard (out x in)':>16}  notes")
        for x in self.layers:
            shard = f"{x.local_shape[0]}x{x.local_shape[1]}"
            lines.append(f"{x.path:<{width}}  {x.style:<10}  {shard:>16}  {'; '.join(x.notes)}")
        for f in self.folds:
            lines.append(f"fold {f.path}: {'folded' if f.folded else 'not folded'}: {f.reason}")
        return "\n".join(lines)


def parallelize(model: nn.Module, group_or_mesh=None, *, tp_aware: bool = True,
                act_order_rows: str = "regroup") -> nn.Module:
    """Keep this rank's shard of `model`'s attention and MLP linears, in place; returns `model`.

    `group_or_mesh`: a ProcessGroup, a 1-D DeviceMesh, or None for the default group (call
    ``torch.distributed.init_process_group()`` first). Every rank must call this on the same model
    (same weights), as it would call any collective. ``tp_aware=False`` keeps the naive act_order
    path (all_gather, permute, slice) for comparison; `act_order_rows` ("regroup" or "gather")
    how row-parallel act_order layers the fold cannot serve (o_proj) run, see the
    module docstring. What was done is in ``model.qcompile_parallel``
    (and `qcompile.explain`'s report). To read only this rank's shard from disk, use
    ``qcompile.load(skeleton, path, parallel=group_or_mesh)`` instead.
    """
    sharder = Sharder(model, group_or_mesh, tp_aware=tp_aware, act_order_rows=act_order_rows)
    sharder.finish()
    return model


class Sharder:
    """Shards a model block by block: `layer_ready` shards a block as soon as a block's linears are in place
    (`qcompile.load(parallel=...)` calls it while reading a checkpoint, so a rank never holds more
    than its shard and one block), `finish` for the rest and the report."""

    def __init__(self, model: nn.Module, group_or_mesh=None, *, tp_aware: bool = True, act_order_rows: str = "regroup"):
        if act_order_rows not in ("regroup", "gather"):
            raise ValueError(f"act_order_rows={act_order_rows!r}: use 'regroup' or 'gather'")
        self.model, self.tp_aware = model, tp_aware
        self.act_order_rows = act_order_rows if tp_aware else "gather"
        self.group = _resolve_group(group_or_mesh)
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.report = ParallelReport(self.world, self.rank, tp_aware, self.act_order_rows)
        self.blocks = {path: (m, kind) for path, m, kind in _find_blocks(model)}
        _check_shardable([(p, m, k) for p, (m, k) in self.blocks.items()], self.world)
        self.done: set[str] = set()
        self.ready: dict[str, set[str]] = {}  # block path -> its linears loaded so far
        self.local: dict[str, tuple] = {}     # layer path -> whole (out, in): read as this rank's shard

    def read_plan(self, path: str, layers_meta: dict) -> tuple[str, int, int] | None:
        """("rows" | "cols", start, end): the part of checkpoint layer `path` this rank needs, or None
        to read it whole (act_order columns, rows the fold will permute, layers outside the blocks)."""
        parent, _, name = path.rpartition(".")
        if self.world == 1 or parent not in self.blocks:
            return None
        kind = self.blocks[parent][1]
        *columns, row = _NAMES[kind]
        meta = layers_meta[path]
        if meta.get("format") == "quik" or name not in _NAMES[kind]:
            return None
        if name in columns:
            if kind != "attention" and self.tp_aware and layers_meta.get(f"{parent}.{row}", {}).get("act_order"):
                return None  # the fold orders these rows by down_proj's perm
            n = meta["out_features"]
            return "rows", self.rank * n // self.world, (self.rank + 1) * n // self.world
        if meta.get("act_order"):
            return None
        k, group = meta["in_features"], meta.get("group_size")
        start, end = self.rank * k // self.world, (self.rank + 1) * k // self.world
        _check_row_groups(parent, k, group, self.world)
        return "cols", start, end

    def layer_ready(self, path: str, local: tuple | None = None) -> None:
        """Linear `path` now holds its weights (`local`: the whole layer's (out, in) when it holds
        this rank's shard already): shard its block if that was the block's last one."""
        if local is not None:
            self.local[path] = local
        parent = path.rpartition(".")[0]
        if parent in self.blocks and parent not in self.done:
            module, kind = self.blocks[parent]
            ready = self.ready.setdefault(parent, set())
            ready.add(path.rpartition(".")[2])
            if ready >= set(_NAMES[kind]):
                self._shard_block(parent)

    def finish(self) -> None:
        for path in self.blocks:
            if path not in self.done:
                self._shard_block(path)
        placed = {f"{p}.{n}" for p, (_, kind) in self.blocks.items() for n in _NAMES[kind]}
        for path, m in self.model.named_modules():
            if isinstance(m, (QuantLinear, nn.Linear)) and path not in placed and path.rpartition(".local")[0] not in placed:
                nbytes = _bytes(m)
                self.report.layers.append(ShardReport(path, "replicated", _shape(m), _shape(m), nbytes, nbytes))
        _set_local_config(self.model, [(p, m, k) for p, (m, k) in self.blocks.items()], self.world)
        colocate_siblings(self.model)  # q/k/v, gate/up shards: one op each again
        self.model.qcompile_parallel = self.report

    def _shard_block(self, path: str) -> None:
        module, kind = self.blocks[path]
        self.done.add(path)
        if not any(f"{path}.{n}" in self.local for n in _NAMES[kind]):  # whole layers: checkable now
            _check_shardable([(path, module, kind)], self.world)  # the weights may have arrived since __init__
        if self.tp_aware and kind != "attention":
            from qcompile.passes.tp_fold import fold_permutations
            for record in fold_permutations(module):
                record.path = ".".join(p for p in (path, record.path) if p)
                self.report.folds.append(record)
        if self.world == 1:
            return  # one rank: the fold is all there is to do
        *columns, row = _NAMES[kind]
        for name in columns:
            layer = getattr(module, name)
            if f"{path}.{name}" in self.local:  # read as this rank's rows
                whole = self.local[f"{path}.{name}"]
                rep = ShardReport("", "column", whole, _shape(layer), _bytes(layer) * whole[0] // layer.out_features,
                                  _bytes(layer), notes=["read as this rank's rows"])
            else:
                n = layer.out_features
                layer, rep = _column_shard(layer, self.rank * n // self.world, (self.rank + 1) * n // self.world)
                setattr(module, name, layer)
            self.report.layers.append(_named(rep, f"{path}.{name}"))
        if f"{path}.{row}" in self.local:  # read as this rank's columns
            layer, whole = getattr(module, row), self.local[f"{path}.{row}"]
            local = QuantLinear(layer.packed_weight(), None, layer.cpu_activations)
            new = _row_parallel(local, None if layer.bias is None else layer.bias.data, self.group, self.world)
            rep = ShardReport("", "row", whole, (whole[0], layer.in_features), _bytes(local) * whole[1] // layer.in_features,
                              _bytes(local), notes=["read as this rank's columns"])
        else:
            new, rep = _row_shard(getattr(module, row), self.group, self.world, self.rank, self.act_order_rows)
        setattr(module, row, new)
        self.report.layers.append(_named(rep, f"{path}.{row}"))
        if kind == "attention":
            _set_local_heads(module, self.world)


# --- finding the blocks ---
def _resolve_group(group_or_mesh) -> dist.ProcessGroup:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("qcompile.parallelize needs torch.distributed: call torch.distributed.init_process_group() "
                           "first (e.g. run the script under `torchrun --nproc-per-node N`)")
    if group_or_mesh is None:
        return dist.group.WORLD
    if hasattr(group_or_mesh, "get_group"):  # DeviceMesh
        if group_or_mesh.ndim != 1:
            raise ValueError(f"qcompile.parallelize takes a 1-D DeviceMesh, got {group_or_mesh.ndim} dimensions: "
                             "pass the tensor-parallel one, e.g. mesh['tp']")
        return group_or_mesh.get_group()
    return group_or_mesh


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    blocks = []
    for path, m in model.named_modules():
        children = dict(m.named_children())
        for kind, names in (("attention", ATTENTION), ("gated_mlp", GATED_MLP), ("mlp", MLP)):
            if all(isinstance(children.get(n), (QuantLinear, nn.Linear)) for n in names):
                blocks.append((path, m, kind))
                break
    if not blocks:
        raise ValueError(f"qcompile.parallelize found no Llama-style block in {type(model).__name__}: it shards modules "
                         f"with children {', '.join(ATTENTION)} (attention) and {', '.join(GATED_MLP)} (MLP)")
    return blocks


def _head_dim(attn: nn.Module) -> int:
    d = getattr(attn, "head_dim", None)
    if not isinstance(d, int):
        raise ValueError(f"{type(attn).__name__} has no integer head_dim: cannot split its heads")
    return d


def _check_shardable(blocks, world: int) -> None:
    """Raise, before anything changes, for a block that cannot split over `world` ranks."""
    for path, m, kind in blocks:
        for name in _NAMES[kind]:
            if isinstance(getattr(m, name), QuantLinear) and getattr(m, name).layout == "quik":
                raise NotImplementedError(
                    f"qcompile.parallelize: {path}.{name} is a QUIK layer; tensor parallelism does not shard QUIK "
                    "weights yet (QUIK quantizes each token's activations over the whole input row, which a "
                    "row-parallel shard does not see). Quantize with GPTQConfig/RTNConfig/GANQConfig to run tensor parallel.")
        if kind == "attention":
            d = _head_dim(m)
            hq, hkv = m.q_proj.out_features // d, m.k_proj.out_features // d
            if hq % world or hkv % world:
                ok = [t for t in range(1, hkv + 1) if hkv % t == 0 and hq % t == 0]
                raise ValueError(f"{path}: {hq} query and {hkv} key/value heads do not split over {world} ranks; "
                                 f"the world size must divide both (here: {ok})")
        else:
            inter = m.down_proj.in_features
            if inter % world:
                raise ValueError(f"{path}: intermediate size {inter} does not split over {world} ranks; "
                                 "use a world size that divides it")
        row = m.o_proj if kind == "attention" else m.down_proj
        # contiguous groups must not straddle two ranks (act_order o_proj is regrouped: any split works)
        group = row.format_meta.get("group_size") if isinstance(row, QuantLinear) else None
        if group and (kind != "attention" or row.perm is None):
            _check_row_groups(path, row.in_features, group, world)


def _check_row_groups(path: str, in_features: int, group: int | None, world: int) -> None:
    if group and (in_features // world) % group:
        raise ValueError(f"{path}: each rank's {in_features // world} input columns of its row-parallel layer "
                         f"are not whole groups of {group}; use a world size T with "
                         f"({in_features} / T) % {group} == 0, or quantize with a smaller group_size")


def _set_local_heads(attn: nn.Module, world: int) -> None:
    # HF attention infers heads from shapes (view(..., -1, head_dim)); older modules keep counts
    for name in ("num_heads", "num_key_value_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, getattr(attn, name) // world)


def _set_local_config(model: nn.Module, blocks, world: int) -> None:
    """The config says the local head counts (what a static KV cache is sized by); head_dim is
    pinned first, since HF derives it from hidden_size / num_attention_heads when absent."""
    config = getattr(model, "config", None)
    attn = next((m for _, m, kind in blocks if kind == "attention"), None)
    if config is None or attn is None or world == 1:
        return
    if getattr(config, "head_dim", None) is None:
        config.head_dim = _head_dim(attn)
    for name in ("num_attention_heads", "num_key_value_heads"):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, getattr(config, name) // world)


# --- sharding one layer ---
def _best_regroup_size(weight, counts: Tensor) -> int:
    """The regrouping (see `regroup_columns`) with the fewest bytes: small groups pad less but
    store more scales. Group sizes stay even (two 4-bit codes a byte)."""
    code_bits = 4 if weight.format_name == "int4" else 8
    group_bytes = 2 * weight.scales.element_size()
    largest = int(counts.max()) + int(counts.max()) % 2
    sizes = sorted({s for s in (8, 16, 32, 64, 128) if s < largest} | {largest})
    return min(sizes, key=lambda s: regrouped_bytes(counts, s, weight.out_features, code_bits, group_bytes))



def _shape(m: nn.Module) -> tuple:
    return (m.out_features, m.in_features)


def _bytes(m: nn.Module) -> int:
    if isinstance(m, QuantLinear):
        return m.packed_weight().nbytes
    return m.weight.numel() * m.weight.element_size()


def _named(rep: ShardReport, path: str) -> ShardReport:
    rep.path = path
    return rep


def _canonical(layer: QuantLinear):
    return lowering.unpack(layer.packed_weight())


def _device(layer: nn.Module) -> torch.device:
    if isinstance(layer, QuantLinear):
        return getattr(layer, layer._tensor_names[0]).device
    return layer.weight.device


def _rebuild(layer: nn.Module, weight, bias: Tensor | None) -> nn.Module:
    """A layer like `layer` computing with `weight` (canonical format or float [N, K])."""
    if isinstance(layer, QuantLinear):
        return QuantLinear(lowering.pack(weight, _device(layer), layer.cpu_activations), bias, layer.cpu_activations)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data = weight
    if bias is not None:
        new.bias.data = bias.detach().clone()
    new.requires_grad_(layer.weight.requires_grad)
    return new


def _column_shard(layer: nn.Module, start: int, end: int) -> tuple[nn.Module, ShardReport]:
    rows = torch.arange(start, end)
    # an act_order perm stays: column-parallel layers read the whole input
    weight = take_rows(_canonical(layer) if isinstance(layer, QuantLinear) else layer.weight.data, rows)
    bias = None if layer.bias is None else layer.bias.data[start:end].clone()
    new = _rebuild(layer, weight, bias)
    notes = ["act_order: the input is gathered (index_select) before the op"] if getattr(new, "perm", None) is not None else []
    return new, ShardReport("", "column", _shape(layer), _shape(new), _bytes(layer), _bytes(new),
                            runtime_index=bool(notes), notes=notes)


def _row_parallel(local: nn.Module, bias, group, world: int, **kwargs) -> RowParallelLinear:
    return RowParallelLinear(local, bias, group.group_name, world, reduce_float32=dist.get_backend(group) == "gloo", **kwargs)


def _row_shard(layer: nn.Module, group, world: int, rank: int, act_order_rows: str) -> tuple[nn.Module, ShardReport]:
    k = layer.in_features
    c0, c1 = rank * k // world, (rank + 1) * k // world
    bias = None if layer.bias is None else layer.bias.data
    quantized = isinstance(layer, QuantLinear)
    weight = _canonical(layer) if quantized else layer.weight.data
    perm = layer.perm if quantized else None
    notes, index, pad, gather = [], None, False, False
    if perm is None:
        local = take_columns(weight, c0, c1)
    elif act_order_rows == "gather":
        local, index, gather = take_columns(weight, c0, c1), perm[c0:c1].clone(), True
        notes.append("act_order: input all-gathered, permuted and sliced")
    else:
        mine = ((perm >= c0) & (perm < c1)).nonzero().flatten()  # stored columns reading this rank's inputs
        if weight.group_size is None:  # per channel (int8): any subset of columns keeps its scales
            local = Int8Weight(weight.qweight[:, mine].contiguous(), weight.scales, weight.zeros)
            index = (perm[mine] - c0).to(torch.int32)
        else:
            counts = torch.bincount(mine // weight.group_size, minlength=k // weight.group_size)
            size = _best_regroup_size(weight, counts)
            local, slot = regroup_columns(weight, mine, size)
            index = torch.full((local.in_features,), c1 - c0, dtype=torch.int32)  # pads read the zero column
            index[slot] = (perm[mine] - c0).to(torch.int32)
            pad = True
            notes.append(f"act_order: columns regrouped per rank ({local.in_features} for {c1 - c0} inputs, groups of "
                         f"{size} instead of {weight.group_size}), one runtime index, no collective")
    new_local = _rebuild(layer, local, None)
    new = _row_parallel(new_local, bias, group, world, input_index=None if index is None else index.to(_device(layer)),
                        pad=pad, gather=gather)
    return new, ShardReport("", "row", _shape(layer), (new.out_features, c1 - c0), _bytes(layer), _bytes(new_local),
                            runtime_index=index is not None, all_gather=gather, notes=notes)
