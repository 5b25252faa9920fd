"""Dead-code removal limited to what a pass itself orphaned.

`fx.Graph.eliminate_dead_code()` erases every unused node it thinks pure, and Dynamo graphs hold
unused nodes that are not: in-place writes whose result nobody reads (a static KV cache's
`index_copy_`, `copy_`), and functorch's vmap bookkeeping (`_vmap_increment_nesting`,
`_add_batch_dim`, in the attention masks of transformers < 5). Erasing those silently changes what
the graph computes. A pass hands over the nodes it disconnected; only they, and inputs that die
with them, are erased.
"""
from __future__ import annotations

import torch.fx as fx


def mutates(node: fx.Node) -> bool:
    """An in-place call: method or function name ending in one underscore (`add_`, `index_copy_`),
    or an aten overload whose schema writes an argument."""
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is not None:
        return schema.is_mutable
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def erase_unused(graph: fx.Graph, nodes) -> int:
    """Erase each of `nodes` that nothing reads, then its inputs that nothing reads any more.

    Placeholders, outputs, in-place calls and nodes FX calls impure are kept. Returns the count.
    """
    stack, erased = list(nodes), set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.is_impure() or mutates(node):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        stack.extend(inputs)
    return len(erased)
