"""Every matmul against a parameter is quantized or reported with the reason it stays float.

(a) one small module per form of writing ``x @ W`` (F.linear, ``.t()``, ``.T``, ``.mT``, transpose,
permute, mm, ``x @ W`` stored [in, out], einsum either way round) is rewritten into the int4 op, and
each form no rewrite takes (3-D expert parameters, an indexed or reshaped weight, a parameter as the
first operand, an unusual einsum, a buffer) is listed with its reason and computes what eager does;
(b) tiny random transformers models whose code multiplies by parameters directly (Falcon's
``x @ weight.T``, GPT-2's Conv1D, MoE experts through grouped_mm / bmm / indexing, DeepSeek-V4's
reshaped grouped weight, XLNet's einsums, MobileBERT's concatenated decoder weight): every matmul parameter is in the report, and the logits
match the float model with the quantized weights replaced by their dequantization.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcompile
from qcompile import RTNConfig
from qcompile.methods import rtn
from qcompile.passes.analysis import _einsum_contraction, _einsum_subscripts, matmul_sites
from qcompile.report import Report

MINMAX = RTNConfig(search="minmax", lm_head_bits=4)  # a deterministic grid the test can rebuild
IN, OUT, GROUP = 128, 96, 64                        # not square: a wrong storage orientation cannot pass


def dequantized(w_oi: torch.Tensor) -> torch.Tensor:
    """What the int4 op computes with: the min/max int4 g64 dequantization of a [out, in] weight."""
    return rtn.quantize_int4(w_oi.detach(), GROUP, search="minmax").dequantize(torch.float32)


def close(a, b, rel=0.02):
    """Agree up to the bf16 rounding of the CPU kernel: relative to the output's spread."""
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# --- (a) each form on its own ------------------------------------------------------------------

# name: (forward(w, x), stored shape, stored [in, out])
REWRITTEN = {
    "linear": (lambda w, x: F.linear(x, w), (OUT, IN), False),
    "t": (lambda w, x: x @ w.t(), (OUT, IN), False),
    "T": (lambda w, x: x @ w.T, (OUT, IN), False),
    "mT": (lambda w, x: x @ w.mT, (OUT, IN), False),
    "matmul_transpose": (lambda w, x: torch.matmul(x, w.transpose(0, 1)), (OUT, IN), False),
    "transpose_neg": (lambda w, x: x @ w.transpose(-1, -2), (OUT, IN), False),
    "permute": (lambda w, x: x @ w.permute(1, 0), (OUT, IN), False),
    "mm": (lambda w, x: torch.mm(x.reshape(-1, IN), w.t()), (OUT, IN), False),
    "in_out": (lambda w, x: x @ w, (IN, OUT), True),
    "cast_T": (lambda w, x: x @ w.to(x.dtype).T, (OUT, IN), False),
    "einsum_oi": (lambda w, x: torch.einsum("bsi,oi->bso", x, w), (OUT, IN), False),
    "einsum_io": (lambda w, x: torch.einsum("...i,io->...o", x, w), (IN, OUT), True),
    "einsum_2d": (lambda w, x: torch.einsum("bi,oi->bo", x.reshape(-1, IN), w), (OUT, IN), False),
    "einsum_weight_first": (lambda w, x: torch.einsum("oi,bsi->bso", w, x), (OUT, IN), False),
}

# name: (forward(w, x), stored shape, buffer?, what the reason must say)
LEFT_FLOAT = {
    "bmm_experts": (lambda w, x: torch.bmm(x, w), (4, IN, OUT), False,
                    "batched matmul (bmm) against a 3-D parameter [4, 128, 96] (stacked experts): "
                    "no quantized op for stacked experts yet"),
    "matmul_experts_t": (lambda w, x: x @ w.transpose(1, 2), (4, OUT, IN), False,
                         "matmul against a 3-D parameter [4, 96, 128] as matmul_experts_t.weight.transpose(1, 2)"),
    "indexed_expert": (lambda w, x: F.linear(x, w[1]), (4, OUT, IN), False,
                       "linear against a 3-D parameter [4, 96, 128] as indexed_expert.weight[...]"),
    "einsum_unusual": (lambda w, x: torch.einsum("bsi,oi->bos", x, w), (OUT, IN), False,
                       "einsum 'bsi,oi->bos' is not a plain linear contraction"),
    "weight_first": (lambda w, x: w @ x.transpose(-1, -2), (OUT, IN), False,
                     "the parameter is the first operand (W @ x)"),
    "reshaped": (lambda w, x: x @ w.reshape(IN, OUT), (OUT, IN), False,
                 "the weight operand is reshaped.weight.reshape(...), computed from the parameter [96, 128]"),
    "buffer": (lambda w, x: x @ w.t(), (OUT, IN), True, "is a buffer, not an nn.Parameter"),
}


class Form(nn.Module):
    """One matmul against its own `weight`, written as `fn(weight, x)`."""

    def __init__(self, fn, shape, buffer=False):
        super().__init__()
        w = torch.randn(*shape) / IN ** 0.5
        if buffer:
            self.register_buffer("weight", w)
        else:
            self.weight = nn.Parameter(w)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.weight, x)


class Forms(nn.Module):
    """All forms in one module (one compile); each reads its own input, so none are fused."""

    def __init__(self, specs: dict):
        super().__init__()
        self.forms = nn.ModuleDict({name: Form(*spec) for name, spec in specs.items()})

    def forward(self, xs):
        return [form(x) for form, x in zip(self.forms.values(), xs)]


def test_every_form_is_quantized_or_reported():
    torch.manual_seed(0)
    specs = {**{k: (fn, shape, False) for k, (fn, shape, _) in REWRITTEN.items()},
             **{k: (fn, shape, buffer) for k, (fn, shape, buffer, _) in LEFT_FLOAT.items()}}
    model = Forms(specs).eval()
    xs = [torch.randn(4, 5, IN) for _ in specs]
    reports = []
    with torch.no_grad():
        eager = model(xs)
        out = torch.compile(model, backend=qcompile.backend(MINMAX, reports=reports))(xs)
    by_name = {x.name: x for g in reports for x in g.linears}
    assert set(by_name) == {f"forms.{k}" for k in specs}, "a matmul against a parameter is missing from the report"
    report = Report(config={}, graphs=reports)  # what explain() and str() show
    assert {x.name for x in report.linears} == set(by_name) and "forms.bmm_experts" in str(report)

    for i, (name, (fn, _, _)) in enumerate(specs.items()):
        rec = by_name[f"forms.{name}"]
        if name in REWRITTEN:
            in_out = REWRITTEN[name][2]
            assert rec.op == "qcompile::int4_mm_a8", (name, rec)
            assert (rec.in_features, rec.out_features) == (IN, OUT), name
            assert name == "linear" or any(n.startswith("as written: ") for n in rec.notes), (name, rec.notes)
            w = model.forms[name].weight
            deq = dequantized(w.t() if in_out else w)
            ref = fn(deq.t() if in_out else deq, xs[i])
            assert close(out[i], ref), (name, (out[i] - ref).abs().max().item())
            assert not close(out[i], eager[i], rel=1e-4), f"{name}: output is the float one"
        else:
            assert rec.op is None and LEFT_FLOAT[name][3] in rec.reason, (name, rec.reason)
            assert any(n.startswith("as written: ") for n in rec.notes), (name, rec.notes)
            torch.testing.assert_close(out[i], eager[i], msg=name)


def _graph(fn, *args):
    """The Dynamo graph of `fn(*args)` and its placeholder values."""
    seen = []

    def grab(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(fn, backend=grab, fullgraph=True)(*args)
    gm, inputs = seen[0]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return gm.graph, dict(zip(phs, inputs))


class Spellings(nn.Module):
    """The same two storages reached through every spelling of a 2-D transpose."""

    def __init__(self):
        super().__init__()
        self.oi = nn.Parameter(torch.randn(OUT, IN))

    def forward(self, x):
        w = self.oi
        return (x @ w.permute([1, 0]), x @ w.transpose(1, 0), x @ w.swapaxes(0, 1), x @ w.t().contiguous(),
                x @ torch.transpose(w, 0, 1), x @ torch.permute(w, (1, 0)), x @ w.T.T.T,
                x @ w.permute(0, 1).mT, F.linear(x, w.t().t()))


def test_transpose_spellings_give_the_storage_orientation():
    torch.manual_seed(0)
    graph, values = _graph(Spellings(), torch.randn(3, IN))
    sites, floats = matmul_sites(graph, values)
    assert not floats
    assert len(sites) == 9 and all(not s.weight_is_in_out for s in sites)


def test_einsum_equations():
    def plain(eq):
        subs, out = _einsum_subscripts(eq, 2)
        return _einsum_contraction(subs[0], subs[1], out)

    assert plain("bsi,oi->bso")[0] == "oi" and plain("...i,io->...o")[0] == "io"
    assert plain("b s i , o i -> b s o")[0] == "oi" and plain("bi,oi")[0] == "oi"  # spaces, implicit output
    assert "not the activation's last dimension" in plain("bis,oi->bso")[1]
    assert "is not the activation's subscripts" in plain("bsi,oi->bos")[1]
    assert "is not the activation's subscripts" in plain("bsi,oi")[1]             # implicit: "bos"
    assert "shares 2 subscripts" in plain("bij,ij->b")[1]
    assert "repeated subscript" in plain("bii,oi->bo")[1]


# --- (b) transformers architectures that multiply by parameters directly -----------------------

_LLM = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)

# name: (model_type, AutoModel class name, config, from_config kwargs, inductor?, forms the report must name)
ARCHITECTURES = {
    # FalconLinear: `input @ self.weight.T` (getattr "T"): quantized
    "falcon": ("falcon", "AutoModelForCausalLM", dict(_LLM, new_decoder_architecture=True, num_kv_heads=2), {},
               True, ["x @ query_key_value.weight.T"]),
    # HF Conv1D: addmm with the weight stored [in, out]: quantized
    "gpt2": ("gpt2", "AutoModelForCausalLM", dict(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                                   tie_word_embeddings=False),
             {}, False, []),
    # experts [E, 2I, H] through transformers' grouped_mm (fp32: its grouped_mm_fallback op) on W.transpose(-2, -1)
    "mixtral": ("mixtral", "AutoModelForCausalLM", dict(_LLM, **_MOE), {}, True,
                ["grouped matmul (grouped_mm) against a 3-D parameter [4, 512, 128] as gate_up_proj.transpose(-2, -1)"]),
    # the batched_mm experts: the parameter indexed per token, then bmm with the weight first
    "mixtral_batched_mm": ("mixtral", "AutoModelForCausalLM", dict(_LLM, **_MOE), {"experts_implementation": "batched_mm"},
                           False, ["batched matmul (bmm) against a 3-D parameter [4, 512, 128] as gate_up_proj[...]"]),
    # experts stored [E, in, out] (is_transposed) with biases; attention sinks
    "gpt_oss": ("gpt_oss", "AutoModelForCausalLM", dict(_LLM, **_MOE, head_dim=32, sliding_window=16,
                                                          layer_types=["sliding_attention", "full_attention"]), {},
                False, ["grouped matmul (grouped_mm) against a 3-D parameter [4, 128, 512]"]),
    # Llama4TextExperts: torch.bmm(hidden, self.gate_up_proj) on [E, in, out]; a shared expert of nn.Linear
    "llama4": ("llama4_text", "AutoModelForCausalLM", dict(_LLM, num_local_experts=4, num_experts_per_tok=1,
                                                           intermediate_size_mlp=256, head_dim=32, moe_layers=[0, 1],
                                                           no_rope_layers=[1, 1], attention_chunk_size=64), {},
               False, ["batched matmul (bmm) against a 3-D parameter [4, 128, 512]"]),
    # routed experts plus a shared expert (nn.Linear) and its 1-output gate
    "qwen2_moe": ("qwen2_moe", "AutoModelForCausalLM", dict(_LLM, num_experts=4, num_experts_per_tok=2,
                                                            moe_intermediate_size=128, shared_expert_intermediate_size=256),
                  {}, False, ["grouped matmul (grouped_mm)"]),
    # DeepseekV4GroupedLinear: o_a_proj.weight.view(groups, ...).transpose(1, 2) under a bmm; hash-routed experts
    "deepseek_v4": ("deepseek_v4", "AutoModelForCausalLM",
                    dict(_LLM, head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                         n_shared_experts=1, q_lora_rank=64, qk_rope_head_dim=32, sliding_window=16,
                         layer_types=["heavily_compressed_attention"] * 2, mlp_layer_types=["hash_moe"] * 2), {},
                    False, ["the weight operand is o_a_proj.weight.view(...).transpose(1, 2), computed from the parameter",
                            "grouped matmul (grouped_mm) against a 3-D parameter [4, 512, 128] as gate_up_proj"]),
    # einsum("ibh,hnd->ibnd", h, self.q) on 3-D [d_model, heads, head_dim] parameters, seg_embed likewise
    "xlnet": ("xlnet", "AutoModelForCausalLM", dict(vocab_size=256, d_model=128, n_layer=2, n_head=4, d_inner=256), {},
              False, ["einsum 'ibh,hnd->ibnd' against a 3-D parameter [128, 4, 32]",
                      "einsum 'ibnd,snd->ibns' against a 3-D parameter [2, 4, 32]"]),
    # the MLM head multiplies by torch.cat([decoder.weight.t(), dense.weight]): two parameters combined
    "mobilebert": ("mobilebert", "AutoModelForMaskedLM", dict(vocab_size=256, hidden_size=128, embedding_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              intermediate_size=128, intra_bottleneck_size=64,
                                                              true_hidden_size=64, num_feedforward_networks=1), {},
                   False, ["combines 2 parameters (word_embeddings.weight, dense.weight)"]),
}

# a >= 2-D parameter no matmul reads: XLNet's mask_emb (used only with target_mapping)
_NOT_MATMUL = ("mask_emb",)


def _matmul_parameters(model) -> set[str]:
    """The model's parameters a matmul reads, derived from the model alone: dim >= 2, not an
    embedding table, not a norm gain, not a bias (MoE experts' [E, out] biases are added)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {name for name, p in model.named_parameters()
            if p.dim() >= 2 and id(p) not in embeddings and "norm" not in name and "bias" not in name
            and name.rsplit(".", 1)[-1] not in _NOT_MATMUL}


def _dequantized_model(model, quantized: set[str]):
    """A copy of `model` whose quantized weights are their min/max int4 g64 dequantization (new
    parameters: a weight tied to the input embedding is untied, the embedding stays float)."""
    from transformers.pytorch_utils import Conv1D

    ref = type(model)(model.config).eval()
    ref.load_state_dict(model.state_dict())
    modules = dict(ref.named_modules())
    for name in quantized:
        mod = modules[name.rsplit(".", 1)[0]]
        in_out = isinstance(mod, Conv1D)  # HF Conv1D stores [in, out]
        deq = dequantized(mod.weight.t() if in_out else mod.weight)
        mod.weight = nn.Parameter(deq.t().contiguous() if in_out else deq)
    return ref


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_architecture_matmuls_are_quantized_or_reported(arch):
    import transformers

    model_type, auto, cfg, kwargs, inductor, forms = ARCHITECTURES[arch]
    torch.manual_seed(0)
    if model_type not in transformers.CONFIG_MAPPING:  # newer than the oldest supported transformers
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r} architecture")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    model = getattr(transformers, auto).from_config(config, **kwargs).eval()
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids}
    if arch == "xlnet":  # segment ids bring in the seg_embed einsum
        inputs["token_type_ids"] = torch.tensor([[0] * 4 + [1] * 4])
    reports = []
    with torch.no_grad():
        out = torch.compile(model, backend=qcompile.Backend(MINMAX, inductor=inductor, reports=reports))(**inputs).logits

    lins = [x for g in reports for x in g.linears]
    reported = {f"{x.path}.{x.weight or 'weight'}" for x in lins}
    missing = _matmul_parameters(model) - reported
    assert not missing, f"{arch}: matmul parameters missing from the report: {sorted(missing)}"
    assert all(x.op or x.reason for x in lins)
    text = "\n".join(f"{x.reason} {' '.join(x.notes)}" for x in lins)
    for form in forms:
        assert form in text, f"{arch}: no report entry says {form!r}:\n{text}"

    quantized = {f"{x.path}.weight" for x in lins if x.op}
    assert quantized, arch
    with torch.no_grad():
        ref = _dequantized_model(model, quantized)(**inputs).logits
    assert close(out, ref), (arch, (out - ref).abs().max().item(), ref.abs().max().item())
