"""The inspection report: what the compiler did to each layer, and why; the graph around each pass."""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LinearReport:
    """One linear layer: the op it now runs (None: stays float) and the reason."""

    path: str
    in_features: int
    out_features: int
    op: str | None
    reason: str
    notes: list[str] = field(default_factory=list)
    float_bytes: int = 0
    quant_bytes: int | None = None
    weight: str | None = None    # the parameter's name in the module when not `weight` (MoE experts: "gate_up_proj")
    activations: str | None = None  # of decode-size inputs (<= 8 rows): "int8" (W4A8/W8A8) or "float"; None: float layer

    @property
    def name(self) -> str:
        """The layer as the report lists it: its path, and the parameter when it is not `weight`."""
        return ".".join(p for p in (self.path, self.weight) if p)


@dataclass
class AttentionReport:
    """One attention site: the pattern found, how K/V heads were repeated, the op it now runs
    (None: left as it was) and the reason."""

    path: str
    pattern: str                 # "sdpa", "sdpa(enable_gqa)", "eager matmul-softmax-matmul", "bloom baddbmm-softmax-bmm"
    q_heads: int | None
    kv_heads: int | None
    head_dim: int | None
    kv_repeat: str               # "expand+reshape", "repeat_interleave", "enable_gqa", "none"
    op: str | None
    reason: str
    notes: list[str] = field(default_factory=list)
    repeated_kv_bytes: int | None = None  # bytes of the repeated K and V at the traced shape (what is no longer made)


@dataclass
class PassRecord:
    name: str
    summary: str
    before: str
    after: str


@dataclass
class GraphReport:
    """One graph Dynamo handed to the backend."""

    index: int
    device: str
    linears: list[LinearReport] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    attention: list[AttentionReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # after the passes: collectives by kind (all_reduce, all_gather_into_tensor, ...) and
    # "runtime_index", the activation permutes (act_order gathers)
    collectives: dict[str, int] = field(default_factory=dict)


@dataclass
class Report:
    """Everything qcompile decided for a model or function (see `qcompile.explain`)."""

    config: dict
    graphs: list[GraphReport] = field(default_factory=list)
    parallel: object = None  # qcompile.parallel.ParallelReport of a model run tensor parallel

    @property
    def linears(self) -> list[LinearReport]:
        """Each decision on a layer's weight once (a layer seen in several graphs, e.g. prefill and
        decode, is listed once; a parameter one matmul quantizes and another reads in float, twice)."""
        seen: dict[tuple, LinearReport] = {}
        for g in self.graphs:
            for lin in g.linears:
                seen.setdefault((lin.path, lin.weight, lin.op, lin.reason), lin)
        return list(seen.values())

    @property
    def attention(self) -> list[AttentionReport]:
        """Each distinct decision per attention site (prefill and decode graphs may differ)."""
        seen: dict = {}
        for g in self.graphs:
            for a in g.attention:
                seen.setdefault((a.path, a.pattern, a.kv_repeat, a.op, a.reason), a)
        return list(seen.values())

    def to_dict(self) -> dict:
        out = {"config": self.config, "graphs": [asdict(g) for g in self.graphs], "summary": self.summary()}
        if self.parallel is not None:
            out["parallel"] = self.parallel.to_dict()
        return out

    def summary(self) -> dict:
        lins = self.linears
        q = [x for x in lins if x.op]
        fb = sum(x.float_bytes for x in q)
        qb = sum(x.quant_bytes or 0 for x in q)
        return {"linears": len(lins), "quantized": len(q), "float": len(lins) - len(q),
                "float_bytes_of_quantized": fb, "quant_bytes": qb,
                "ratio": round(qb / fb, 4) if fb else None, "graphs": len(self.graphs),
                "int8_activations": sum(1 for x in q if x.activations == "int8"),
                "attention_sites": sum(len(g.attention) for g in self.graphs),
                "attention_rewritten": sum(1 for g in self.graphs for a in g.attention if a.op),
                "collectives": _add_counts(g.collectives for g in self.graphs)}

    def __str__(self) -> str:
        lines = [f"qcompile report  config={self.config.get('method', '?')} "
                 + " ".join(f"{k}={v}" for k, v in self.config.items() if k != "method")]
        s = self.summary()
        lines.append(f"{s['quantized']}/{s['linears']} linears quantized across {s['graphs']} graph(s); "
                     + (f"their weights {s['float_bytes_of_quantized'] / 2**20:.1f} MiB -> "
                        f"{s['quant_bytes'] / 2**20:.1f} MiB ({s['ratio']:.3f}x)" if s['ratio'] else "no weights changed"))
        width = max([len(x.name) for x in self.linears] + [6])
        # x: the activations decode-size inputs (<= 8 rows) are multiplied as; prefill runs float
        # (quik_mm: int4 or int8 per token at every size)
        lines.append(f"{'layer':<{width}}  {'shape':>11}  {'op':<24}  {'x':<5}  reason")
        for x in self.linears:
            shape = f"{x.out_features}x{x.in_features}"
            op = (x.op or "- (float)").replace("qcompile::", "")
            note = f"  [{'; '.join(x.notes)}]" if x.notes else ""
            lines.append(f"{x.name:<{width}}  {shape:>11}  {op:<24}  {x.activations or '-':<5}  {x.reason}{note}")
        if self.attention:
            lines.append(f"attention: {s['attention_rewritten']}/{s['attention_sites']} sites rewritten across "
                         f"{s['graphs']} graph(s)")
            width = max(len(a.path) for a in self.attention)
            lines.append(f"{'site':<{width}}  {'pattern':<27}  {'heads q/kv':>10}  {'K/V repeat':<17}  {'op':<14}  reason")
            for a in self.attention:
                heads = f"{a.q_heads}/{a.kv_heads}" if a.q_heads else "?"
                op = (a.op or "- (kept)").replace("qcompile::", "")
                note = f"  [{'; '.join(a.notes)}]" if a.notes else ""
                lines.append(f"{a.path:<{width}}  {a.pattern:<27}  {heads:>10}  {a.kv_repeat:<17}  {op:<14}  {a.reason}{note}")
        if self.parallel is not None:
            lines.append(str(self.parallel))
        for g in self.graphs:
            comm = ", ".join(f"{k}={v}" for k, v in sorted(g.collectives.items()))
            lines.append(f"graph {g.index} ({g.device}): " + "; ".join(f"{p.name}: {p.summary}" for p in g.passes)
                         + (f"; runs {comm}" if comm else "")
                         + ("" if not g.notes else "  notes: " + "; ".join(g.notes)))
        lines.append("(report.graphs[i].passes[j].before / .after hold each graph's code)")
        return "\n".join(lines)


def _add_counts(counts) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def dump(report: GraphReport, config: dict, directory: str | os.PathLike) -> Path:
    """Write one graph's report (JSON, text, and each pass's graph before/after) under `directory`."""
    root = Path(directory)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-graph{report.index}"
    out = root / stamp
    out.mkdir(parents=True, exist_ok=True)
    single = Report(config=config, graphs=[report])
    (out / "report.json").write_text(json.dumps(single.to_dict(), indent=1))
    (out / "report.txt").write_text(str(single) + "\n")
    for i, p in enumerate(report.passes):
        (out / f"{i}-{p.name}.before.py").write_text(p.before)
        (out / f"{i}-{p.name}.after.py").write_text(p.after)
    return out
