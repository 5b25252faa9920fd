"""Read and write whole Hugging Face GPTQ checkpoint directories (the layer layout is in
`qcompile.formats.gptq_hf`).

A GPTQ directory holds *.safetensors (one file, or shards listed by model.safetensors.index.json)
with `<layer>.qweight/qzeros/scales/g_idx[/bias]` per quantized linear and ordinary tensors for
the rest, and its config in quantize_config.json or config.json["quantization_config"].
`qcompile.load` / `qcompile.save(format="gptq")` call these; nothing is dequantized on the way.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import lowering
from ..config import QuantConfig, cpu_activations_for
from ..errors import CheckpointError
from . import Int4Weight, gptq_hf, standalone
from .safetensors_reader import SafetensorsFile
from .slicing import gptq_file_slices, take_rows
from ..modules import QuantEmbedding, QuantLinear, _set_module, colocate_siblings, holds_own_tensors, linear_modules

INDEX_FILE = "model.safetensors.index.json"
TENSORS_FILE = "model.safetensors"


class _Tensors:
    """The tensors of every safetensors file of a checkpoint directory, read on demand."""

    def __init__(self, path: Path):
        index = path / INDEX_FILE
        if index.is_file():
            weight_map = gptq_hf._read_json(index).get("weight_map", {})
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has a GPTQ config but no *.safetensors file")
        self.where: dict[str, SafetensorsFile] = {}
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file} not found: {index.name} lists it")
            handle = SafetensorsFile(file)
            for name in handle.keys():
                self.where[name] = handle

    def keys(self) -> set[str]:
        return set(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.where[name].shape(name)

    def read(self, name: str, index: tuple | None) -> torch.Tensor:
        """The tensor, or its `index` slice (read as such) where one is given."""
        return self[name] if index is None else self.where[name].get_slice(name, index)


@torch.no_grad()
def load_gptq(model: nn.Module, path: Path, config: dict, device: torch.device,
              cpu_activations: str = QuantConfig.cpu_activations, sharder=None) -> nn.Module:
    """Fill `model` in place from GPTQ checkpoint directory `path` (`config` from gptq_hf.find_config)."""
    tensors = _Tensors(path)
    keys = tensors.keys()
    prefixes = sorted(k.removesuffix(".qweight") for k in keys if k.endswith(".qweight"))
    if not prefixes:
        raise CheckpointError(f"{path}: no quantized layer (<layer>.qweight) in its safetensors files")
    linears = {p: (m, w) for p, m, w in linear_modules(model)}
    input_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    used: set[str] = set()
    untied = False
    for prefix in prefixes:
        if prefix not in linears:
            raise CheckpointError(f"GPTQ layer {prefix!r} has no linear layer at that path in {type(model).__name__}: "
                                  "the checkpoint is for another architecture")
        for required in ("qzeros", "scales"):
            if f"{prefix}.{required}" not in tensors:
                raise CheckpointError(f"{path}: GPTQ layer {prefix} has a qweight but no {required}")
    layers_meta = _layers_meta(tensors, prefixes, linears) if sharder is not None else {}
    for prefix in prefixes:
        mod, w = linears[prefix]
        n, k = w.shape
        present = {t: f"{prefix}.{t}" for t in gptq_hf.TENSOR_NAMES if f"{prefix}.{t}" in tensors}
        bits = gptq_hf.layer_bits(tensors.shape(present["qweight"])[0], k, prefix, config["bits"])
        if bits != config["bits"] and not config["dynamic"]:
            raise CheckpointError(f"{prefix}.qweight holds {bits}-bit codes, but {config['source']} says "
                                  f"bits={config['bits']}: the config does not belong to these tensors")
        # a tensor-parallel rank reads only its rows / columns where the packing allows
        plan = sharder.read_plan(prefix, layers_meta) if sharder is not None else None
        slices = {}  # none: read whole
        if plan is not None and len(tensors.shape(present["scales"])) == 2:
            slices = gptq_file_slices(bits, tensors.shape(present["scales"])[0], k, *plan) or {}
        layer = {t: tensors.read(key, slices.get(t)) for t, key in present.items()}
        if slices:
            axis, start, end = plan
            n, k = (end - start, k) if axis == "rows" else (n, end - start)
            if axis == "cols" and "g_idx" in layer and "scales" in slices:  # the rank's groups count from 0
                layer["g_idx"] = layer["g_idx"] - slices["scales"][0].start
        if layer["scales"].dim() != 2 or layer["scales"].shape[1] != n:
            raise CheckpointError(f"layer {prefix}: checkpoint scales {tuple(layer['scales'].shape)} do not fit its "
                                  f"{n} output features: the checkpoint is for another architecture or configuration")
        weight = gptq_hf.to_qcompile(layer, bits, config["zero_format"], config["group_size"], k, n, prefix)
        why = lowering.unsupported_reason(weight.format_name, n, k, weight.group_size, device)
        if why is not None:
            raise CheckpointError(f"{prefix}: {why}")
        bias = None
        if f"{prefix}.bias" in tensors:
            bias = tensors.read(f"{prefix}.bias", slices.get("bias")).to(device=device, dtype=w.dtype)
            used.add(f"{prefix}.bias")
        untied |= input_emb is not None and getattr(input_emb, "weight", None) is mod.weight
        acts = cpu_activations_for(cpu_activations, prefix, weight.format_name)
        _set_module(model, prefix, QuantLinear(lowering.pack(weight, device, acts), bias))
        used.update(present.values())
        if sharder is not None:
            sharder.layer_ready(prefix, local=tuple(w.shape) if slices else None)
    _load_float_tensors(model, tensors, used, device, path)
    if untied and hasattr(getattr(model, "config", None), "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the quantized head no longer shares the float table
    _share_int8_table(model)
    colocate_siblings(model)
    if sharder is not None:
        sharder.finish()
    return model


def _layers_meta(tensors: _Tensors, prefixes: list[str], linears: dict) -> dict[str, dict]:
    """What tensor parallelism's read plan needs of each GPTQ layer (qcompile's per-layer metadata
    keys): shape, group size, and whether its groups are out of input order (act_order: read whole)."""
    meta = {}
    for prefix in prefixes:
        n, k = linears[prefix][1].shape
        groups = tensors.shape(f"{prefix}.scales")[0]
        act_order = False
        if f"{prefix}.g_idx" in tensors and k % groups == 0:
            act_order = not torch.equal(tensors[f"{prefix}.g_idx"].long(), torch.arange(k) // (k // groups))
        meta[prefix] = {"format": "gptq", "out_features": n, "in_features": k, "act_order": act_order or k % groups != 0,
                        "group_size": k // groups if groups > 1 and k % groups == 0 else None}
    return meta


def _share_int8_table(model: nn.Module) -> None:
    """A float embedding that is exactly an int8 head's table (what `save_gptq` writes for a tied
    model) reads that table again, as after `qcompile.quantize`: one copy, not two."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(emb, nn.Embedding) or not isinstance(head, QuantLinear) or head.layout != "int8":
        return
    if tuple(emb.weight.shape) != (head.out_features, head.in_features):
        return
    table = lowering.unpack(head.packed_weight())
    rows = torch.arange(head.out_features)
    # a block of rows at a time: dequantizing the whole table would hold three float copies of it
    if all(torch.equal(take_rows(table, r).dequantize(emb.weight.dtype).to(emb.weight.device), emb.weight[r[0]:r[-1] + 1])
           for r in rows.split(1024)):
        path = next(p for p, m in model.named_modules() if m is emb)
        _set_module(model, path, QuantEmbedding(head, emb.weight.dtype, emb.padding_idx))


def _load_float_tensors(model: nn.Module, tensors: _Tensors, used: set[str], device: torch.device, path: Path) -> None:
    """Every parameter and persistent buffer outside the quantized layers, cast to the model's dtype.
    Tied tensors (one object under several names) stay one object."""
    persistent = set(model.state_dict(keep_vars=True))
    by_object: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if holds_own_tensors(owner):
            continue
        by_object.setdefault(id(t), (t, []))[1].append(name)
    missing, on_meta, transient = [], [], set()
    for old, names in by_object.values():
        saved = [n for n in names if n in persistent]
        if not saved:  # a non-persistent buffer (rotary inv_freq, ...): the model computes it
            transient.update(names)
            if old.device.type == "meta" and not _compute_buffer(model, names, device):
                on_meta.extend(names)
            continue
        src = next((n for n in saved if n in tensors), None)
        if src is None:
            missing.extend(saved)
            continue
        used.update(n for n in saved if n in tensors)
        value = tensors[src]
        if tuple(value.shape) != tuple(old.shape):
            raise CheckpointError(f"tensor {src}: checkpoint shape {tuple(value.shape)}, model shape {tuple(old.shape)}")
        value = value.to(device=device, dtype=old.dtype if old.is_floating_point() and value.is_floating_point() else value.dtype)
        new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
        _place(model, names, new)
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors the model has, e.g. {missing[:5]}: "
                              "it was saved from another architecture or configuration")
    if on_meta:
        raise CheckpointError(f"buffers {on_meta[:5]} are on the meta device and are not saved in checkpoints "
                              "(the model computes them when built, and their module cannot be rebuilt from its "
                              "config): build the model on a real device, or those modules after building on meta")
    unexpected = tensors.keys() - used - transient
    if unexpected:
        raise CheckpointError(f"{path} has {len(unexpected)} tensors the model lacks, e.g. {sorted(unexpected)[:5]}")


def _compute_buffer(model: nn.Module, names: list[str], device: torch.device) -> bool:
    """A meta model's non-persistent buffer (a GPTQ file does not hold it): build its module, one
    without parameters, again from its config on `device` (Hugging Face rotary embeddings:
    `Module(config)`) and take the buffer from it. False where the module cannot be built that way."""
    owner_path, _, attr = names[0].rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    config = getattr(owner, "config", None)
    if config is None or next(owner.parameters(), None) is not None:  # only small parameter-free modules
        return False
    try:
        with torch.device(device):
            fresh = type(owner)(config)
    except (TypeError, ValueError, AttributeError, KeyError):
        return False
    value = fresh._buffers.get(attr)
    if value is None or value.device.type == "meta":
        return False
    _place(model, names, value)
    return True


def _place(model: nn.Module, names: list[str], value: torch.Tensor) -> None:
    """`value` as the parameter or buffer under each of `names` (tied names: one object)."""
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if isinstance(value, nn.Parameter):
            setattr(owner, attr, value)
        else:
            owner._buffers[attr] = value


def _is_symmetric(weight) -> bool:
    if isinstance(weight, Int4Weight):
        return bool(torch.all(weight.zeros == 2 ** (weight.bits - 1)))
    return weight.zeros is None or bool(torch.all(weight.zeros == 0))


def save_gptq(model: nn.Module, path: Path, zero_format: str = "gptq") -> Path:
    """Write `model`'s quantized layers as a GPTQ checkpoint (model.safetensors, quantize_config.json,
    and config.json with quantization_config for a Hugging Face model). Raises ValueError naming
    the first layer GPTQ cannot express."""
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    skip_prefixes = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            weight = lowering.unpack(mod.packed_weight())
            layer, bits, group = gptq_hf.from_qcompile(weight, zero_format, name)
            tensors.update({f"{name}.{t}": standalone(v) for t, v in layer.items()})
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            layers[name] = {"bits": bits, "group_size": group, "sym": _is_symmetric(weight),
                            "desc_act": weight.perm is not None}
            skip_prefixes.append(name + ".")
        elif isinstance(mod, QuantEmbedding):  # GPTQ embeddings are float: write the table it reads
            head = mod.lm_head[0]
            tensors[f"{name}.weight"] = lowering.unpack(head.packed_weight()).dequantize(mod.dtype).cpu().contiguous()
    if not layers:
        raise ValueError("model has no quantized layers: call qcompile.quantize(model) or qcompile.load first")
    # Tied tensors are stored once only where the config makes Hugging Face re-tie them on load.
    retied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    seen = set()
    for name, t in model.state_dict().items():
        if name.startswith(tuple(skip_prefixes)) or name in tensors:
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key in seen and retied:
            continue
        tensors[name] = t.detach().cpu().clone() if key in seen else t.detach().cpu().contiguous()
        seen.add(key)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / TENSORS_FILE), metadata={"format": "pt"})

    config = _quantize_config(layers, zero_format)
    (path / gptq_hf.QUANTIZE_CONFIG).write_text(json.dumps(config, indent=1))
    if hasattr(getattr(model, "config", None), "to_json_string"):
        hf = json.loads(model.config.to_json_string(use_diff=False))
        hf["quantization_config"] = config
        (path / "config.json").write_text(json.dumps(hf, indent=1))
    return path


def _quantize_config(layers: dict[str, dict], zero_format: str) -> dict:
    """quantize_config.json: the most common (bits, group_size) as the base, every other layer as a
    GPTQModel `dynamic` override; desc_act/sym true only when true of every layer's tensors (some
    kernels ignore g_idx or qzeros when they are false/true)."""
    import qcompile

    base_bits, base_group = Counter((v["bits"], v["group_size"]) for v in layers.values()).most_common(1)[0][0]
    dynamic = {f"+:^{name.replace('.', '[.]')}$": {"bits": v["bits"], "group_size": v["group_size"]}
               for name, v in layers.items() if (v["bits"], v["group_size"]) != (base_bits, base_group)}
    config = {
        "bits": base_bits, "group_size": base_group,
        "desc_act": any(v["desc_act"] for v in layers.values()),
        "sym": all(v["sym"] for v in layers.values()),
        "lm_head": any(name.rsplit(".", 1)[-1] in ("lm_head", "embed_out") for name in layers),
        "static_groups": False, "true_sequential": True,
        "quant_method": "gptq", "method": "gptq",
        "checkpoint_format": zero_format, "format": zero_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"qcompile:{qcompile.__version__}"]},
    }
    if dynamic:
        config["dynamic"] = dynamic
    return config
