"""What every pass gets: the config, the real graph inputs, a place for new inputs, the report."""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from qcompile.config import AttentionConfig, QuantConfig
from qcompile.report import GraphReport

from . import weight_cache


class WeightStore:
    """Quantized weights the backend made from float parameters, kept while the parameters live.

    Dynamo recompiles a model for new shapes (prefill, then decode); each compile finds the
    weights it quantized before instead of quantizing (and holding) them again. An entry is
    rebuilt when a parameter is modified in place (its version counter moves).
    """

    def __init__(self):
        self._entries: dict = {}

    def get(self, params: tuple[torch.nn.Parameter, ...], extra_key, make, describe=None, device=None):
        """`make()`'s packed weight for `params`, made once while they live. `describe()`: (description,
        tensors) that determine it, for the on-disk cache across processes (weight_cache.py)."""
        ids = tuple(id(p) for p in params)
        key = (ids, tuple(p._version for p in params), extra_key)
        if key not in self._entries:
            for stale in [k for k in self._entries if k[0] == ids and k[2] == extra_key]:
                del self._entries[stale]
            self._entries[key] = make() if describe is None else weight_cache.made_or_loaded(make, describe, device)
            for p in params:
                weakref.finalize(p, self._entries.pop, key, None)
        return self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


STORE = WeightStore()


@dataclass
class PassContext:
    config: QuantConfig
    device: torch.device
    values: dict                      # placeholder node -> the real tensor Dynamo passed
    report: GraphReport
    fuse_projections: bool = True
    store: WeightStore = STORE
    new_inputs: list[torch.Tensor] = field(default_factory=list)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    path_prefix: str = ""             # the graph's root module inside the compiled one (analysis.root_prefix)
    # how to remake new inputs from other values of the graph's own inputs: (placeholders read,
    # remake(values: placeholder -> tensor) -> tensors), one per group of new inputs, in order.
    # Dynamo reuses a graph for every module sharing its code (a graph break inside a decoder
    # layer compiles the rest of that layer once for all layers), with other parameters.
    remakes: list = field(default_factory=list)

    def add_input(self, graph: fx.Graph, name: str, tensor: torch.Tensor) -> fx.Node:
        """A new graph input (appended after the existing ones) that will be fed `tensor`."""
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        with graph.inserting_after(last):
            node = graph.placeholder(name)
        self.values[node] = tensor
        self.new_inputs.append(tensor)
        return node
