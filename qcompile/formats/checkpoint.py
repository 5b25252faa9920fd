"""Save and load quantized models: safetensors for tensors, JSON for what they mean.

A checkpoint is a directory with
  model.safetensors   every tensor of the model; quantized layers in their canonical format
                      (`qcompile.formats`), so a file written on CPU loads on GPU and back;
  qcompile.json       format version, the quantization config, per-layer format, tied tables,
                      and the SHA-256 of model.safetensors (checked on load).
`load` also reads Hugging Face GPTQ checkpoints, and `save(..., format="gptq")` writes them
(`qcompile.formats.gptq_checkpoint`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .. import lowering
from ..config import CPU_ACTIVATIONS, QuantConfig, cpu_activations_for
from ..errors import CheckpointError
from . import FORMATS, gptq_hf, standalone
from .safetensors_reader import SafetensorsFile
from .slicing import file_slices
from ..modules import (QuantEmbedding, QuantLinear, _path_of, _set_module, colocate_siblings, holds_own_tensors,
                       linear_modules)
from .gptq_checkpoint import load_gptq, save_gptq

TENSORS_FILE = "model.safetensors"
META_FILE = "qcompile.json"
FORMAT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


SAVE_FORMATS = ("qcompile", *gptq_hf.ZERO_FORMATS)


def save(model: nn.Module, path: str | Path, *, format: str = "qcompile") -> Path:
    """Write `model` (quantized by `qcompile.quantize` or `load`) to directory `path`.

    format: "qcompile" (every format qcompile has), or a Hugging Face GPTQ checkpoint that other
    tools load: "gptq" (zero-points stored minus one, the common v1 layout) or "gptq_v2". GPTQ
    holds integer zero-points only: layers it cannot express raise ValueError naming the layer.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"qcompile.save(format={format!r}): use one of {SAVE_FORMATS}")
    if getattr(model, "qcompile_parallel", None) is not None:
        raise ValueError("qcompile.save: this model holds one rank's tensor-parallel shard; save the whole model "
                         "before qcompile.parallelize, and load it with qcompile.load(..., parallel=...)")
    if format != "qcompile":
        return save_gptq(model, Path(path), format)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    tied: dict[str, str] = {}
    quantized_prefixes = []
    written: set[int] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            canonical = lowering.unpack(mod.packed_weight())
            for tname, t in getattr(canonical, "file_tensors", canonical.tensors)().items():
                # siblings may share a tensor (QUIK's outlier indices): each layer stores its own copy
                shared = t.untyped_storage().data_ptr() in written
                written.add(t.untyped_storage().data_ptr())
                tensors[f"{name}.{tname}"] = t.detach().cpu().clone() if shared else standalone(t)
            if mod.bias is not None:
                tensors[f"{name}.bias"] = mod.bias.detach().cpu().contiguous()
            layers[name] = canonical.meta() | {"bias": mod.bias is not None, "cpu_activations": mod.cpu_activations}
            quantized_prefixes.append(name + ".")
        elif isinstance(mod, QuantEmbedding):
            tied[name] = _path_of(model, mod.lm_head[0])
    if not layers:
        raise ValueError("model has no quantized layers: call qcompile.quantize(model) first")
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if name.startswith(tuple(quantized_prefixes)):
            continue
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.device.type != "meta" and key in seen:
            aliases[name] = seen[key]  # a tied tensor: stored once
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    save_file(tensors, str(out / TENSORS_FILE))
    meta = {
        "format": "qcompile", "version": FORMAT_VERSION,
        "config": getattr(getattr(model, "qcompile_report", None), "config", None),
        "layers": layers, "tied_embeddings": tied, "aliases": aliases,
        "sha256": _sha256(out / TENSORS_FILE),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return out


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} not found: {path} is neither a checkpoint written by qcompile.save "
                              f"nor a GPTQ checkpoint ({gptq_hf.QUANTIZE_CONFIG}, or config.json with a "
                              "quantization_config)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is not valid JSON ({e}): the checkpoint is corrupted") from None
    if meta.get("format") != "qcompile" or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported checkpoint format {meta.get('format')!r} "
                              f"version {meta.get('version')!r} (this qcompile reads version {FORMAT_VERSION})")
    return meta


@torch.no_grad()
def load(model: nn.Module, path: str | Path, *, device: torch.device | str | None = None,
         verify: bool = True, cpu_activations: str | None = None, parallel=None, tp_aware: bool = True,
         act_order_rows: str = "regroup") -> nn.Module:
    """Load a checkpoint written by `save`, or a Hugging Face GPTQ checkpoint directory, into
    `model` (float, or built on the meta device), in place.

    Linear layers named in the checkpoint become `QuantLinear`s (no re-quantization, no
    dequantization); every other tensor is replaced by the checkpoint's (GPTQ: cast to the model's
    dtype). `device` defaults to the model's (CPU for a meta model). `cpu_activations` ("int8" or
    "float", see `QuantConfig`; applied per layer by `config.cpu_activations_for`) overrides what each
    layer was saved with (files from before the setting: the saved config's, else QuantConfig's
    default, as for GPTQ checkpoints).
    `parallel` (a ProcessGroup, a 1-D DeviceMesh, or True for the default group): tensor parallel
    as `qcompile.parallelize`: a rank reads its rows / columns of layers without act_order as slices
    of the file, other layers whole, each block sharded as soon as it is read; it keeps its shard and
    the replicated parts (`tp_aware`, `act_order_rows` as there).
    Raises `CheckpointError` for a missing, corrupted or mismatched checkpoint.
    """
    if cpu_activations is not None and cpu_activations not in CPU_ACTIVATIONS:
        raise ValueError(f"qcompile.load(cpu_activations={cpu_activations!r}): use one of {CPU_ACTIVATIONS}")
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} not found")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None and first.device.type != "meta" else torch.device("cpu")
    device = torch.device(device)
    sharder = _sharder(model, parallel, tp_aware, act_order_rows)
    if not (path / META_FILE).is_file() and (gptq := gptq_hf.find_config(path)) is not None:
        return load_gptq(model, path, gptq, device, cpu_activations or QuantConfig.cpu_activations, sharder)
    meta = _read_meta(path)
    saved = (meta.get("config") or {}).get("cpu_activations", QuantConfig.cpu_activations)
    tensor_path = path / TENSORS_FILE
    if not tensor_path.is_file():
        raise CheckpointError(f"{tensor_path} not found")
    if verify and _sha256(tensor_path) != meta.get("sha256"):
        raise CheckpointError(f"{tensor_path} does not match the SHA-256 recorded in {META_FILE}: "
                              "the file is corrupted or was replaced")
    with SafetensorsFile(tensor_path) as f:
        return _load_tensors(model, f, meta, saved, device, cpu_activations, sharder)


def _load_tensors(model: nn.Module, f: SafetensorsFile, meta: dict, saved: str, device: torch.device,
                  cpu_activations: str | None, sharder) -> nn.Module:
    tensor_path = f.path
    keys = set(f.keys())
    loaded: dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in keys:
            raise CheckpointError(f"{tensor_path} lacks tensor {name!r} listed in {META_FILE}")
        if name not in loaded:  # aliases (tied tensors) share one tensor
            loaded[name] = f.get(name)
        return loaded[name]

    linears = {p: (m, w) for p, m, w in linear_modules(model)}
    linears.update({p: (m, None) for p, m in model.named_modules() if isinstance(m, QuantLinear)})
    used = set()
    for lpath, lmeta in meta["layers"].items():
        if lpath not in linears:
            raise CheckpointError(f"checkpoint layer {lpath!r} has no linear layer at that path in "
                                  f"{type(model).__name__}: the checkpoint is for another architecture")
        mod, _ = linears[lpath]
        n, k = lmeta["out_features"], lmeta["in_features"]
        have = (mod.out_features, mod.in_features) if hasattr(mod, "out_features") else tuple(reversed(mod.weight.shape))
        if tuple(have) != (n, k):
            raise CheckpointError(f"layer {lpath}: checkpoint is {n}x{k} (out x in), model has {have[0]}x{have[1]}")
        if lmeta.get("format") not in FORMATS:
            raise CheckpointError(f"layer {lpath}: unknown format {lmeta.get('format')!r} (this qcompile reads {sorted(FORMATS)})")
        fmt = FORMATS[lmeta["format"]]
        if hasattr(fmt, "file_names"):
            names = fmt.file_names(lmeta)
        elif lmeta["format"] == "lut":
            names = ["codes", "tables"] + (["outlier_rows", "outlier_cols", "outlier_values"] if lmeta.get("outliers") else [])
        else:
            names = ["qweight", "scales"]
            if lmeta["format"] == "int4" or lmeta.get("zeros"):  # int8 without "zeros" (older files): symmetric
                names.append("zeros")
            if lmeta.get("act_order"):
                names.append("perm")
        # a tensor-parallel rank reads only its rows / columns where the file layout allows
        plan = sharder.read_plan(lpath, meta["layers"]) if sharder is not None else None
        slices = file_slices(lmeta, *plan) if plan is not None else None
        if slices is None:
            fields = {t: get(f"{lpath}.{t}") for t in names}
        else:
            fields = {t: f.get_slice(f"{lpath}.{t}", slices[t]) if t in slices else get(f"{lpath}.{t}") for t in names}
        used.update(f"{lpath}.{t}" for t in names)
        fields["group_size"] = lmeta.get("group_size")
        if lmeta["format"] == "int4":
            fields["bits"] = lmeta.get("bits", 4)
        try:
            canonical = fmt.from_file(fields, lmeta) if hasattr(fmt, "from_file") else fmt(**fields)
        except (ValueError, RuntimeError) as e:
            raise CheckpointError(f"layer {lpath}: {e}") from None
        bias = get(f"{lpath}.bias") if lmeta["bias"] else None
        if bias is not None:
            used.add(f"{lpath}.bias")
            bias = bias.to(device)
            if slices is not None and plan[0] == "rows":
                bias = bias[plan[1]:plan[2]]
        # the layer's own setting as saved; else (an override, or a file from before the setting) the config's
        acts = (lmeta.get("cpu_activations") if cpu_activations is None else None) or \
            cpu_activations_for(cpu_activations or saved, lpath, lmeta["format"])
        _set_module(model, lpath, QuantLinear(lowering.pack(canonical, device, acts), bias))
        for t in names:  # the layer holds its own (packed) tensors now: the file's go
            loaded.pop(f"{lpath}.{t}", None)
        if sharder is not None:  # after sharding, only its shard stays
            sharder.layer_ready(lpath, local=(n, k) if slices is not None else None)

    for emb_path, head_path in meta.get("tied_embeddings", {}).items():
        emb = model.get_submodule(emb_path)
        head = model.get_submodule(head_path)
        dtype = emb.dtype if isinstance(emb, QuantEmbedding) else emb.weight.dtype
        _set_module(model, emb_path, QuantEmbedding(head, dtype, getattr(emb, "padding_idx", None)))

    aliases = meta.get("aliases", {})
    missing = []
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if holds_own_tensors(model.get_submodule(name.rpartition(".")[0]) if "." in name else model):
            continue
        src = aliases.get(name, name)
        if src not in keys:
            missing.append(name)
            continue
        used.add(src)
        _assign(model, name, get(src) if device.type == "cpu" else get(src).to(device))
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model has, e.g. {missing[:5]}: "
                              "it was saved from another architecture or configuration")
    unexpected = keys - used
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} tensors the model lacks, e.g. {sorted(unexpected)[:5]}")
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings") and meta.get("tied_embeddings"):
        model.config.tie_word_embeddings = False
    colocate_siblings(model)
    if sharder is not None:
        sharder.finish()
    return model


def _sharder(model: nn.Module, parallel, tp_aware: bool, act_order_rows: str):
    if parallel is None or parallel is False:
        return None
    from qcompile.parallel import Sharder  # the one upward import: loading a shard is tensor parallelism's
    return Sharder(model, None if parallel is True else parallel, tp_aware=tp_aware, act_order_rows=act_order_rows)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    old = getattr(owner, attr)
    if tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(f"tensor {name}: checkpoint shape {tuple(value.shape)}, model shape {tuple(old.shape)}")
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = value
