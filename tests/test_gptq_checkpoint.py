"""Hugging Face GPTQ checkpoints: read and written byte for byte as published, checked against
test vectors packed here by hand (per-bit loops, and AutoGPTQ's own 3-bit loop), independently
of qcompile's packing code."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import qcompile
from qcompile import RTNConfig, lowering
from qcompile.errors import CheckpointError
from qcompile.formats import Int4Weight, Int8Weight, gptq_hf, pack_nibbles
from qcompile.modules import QuantEmbedding, QuantLinear
from qcompile.quantize import linear_modules
from tests.conftest import tiny_llama


# --- hand packing, written from the published format ------------------------------------------
def hand_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack [R, C] codes along R into int32 words, as AutoGPTQ's QuantLinear.pack does."""
    values = values.astype(np.uint64)
    rows = values.shape[0]
    words = np.zeros((rows * bits // 32, values.shape[1]), dtype=np.uint64)
    if bits == 3:  # AutoGPTQ's loop: 32 codes in 3 words, codes 10 and 21 split across words
        i, row = 0, 0
        while row < words.shape[0]:
            for j in range(i, i + 10):
                words[row] |= values[j] << (3 * (j - i))
            i += 10
            words[row] |= values[i] << 30
            row += 1
            words[row] |= (values[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                words[row] |= values[j] << (3 * (j - i) + 1)
            i += 10
            words[row] |= values[i] << 31
            row += 1
            words[row] |= (values[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                words[row] |= values[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    else:  # one bit at a time: code i of a word sits at bits (i % per_word) * bits ...
        per_word = 32 // bits
        for i in range(rows):
            for b in range(bits):
                words[i // per_word] |= ((values[i] >> np.uint64(b)) & np.uint64(1)) << np.uint64((i % per_word) * bits + b)
    return (words & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def hand_unpack(words: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Codes back from int32 words, one bit at a time: bit b of code i is stream bit i * bits + b."""
    w = words.view(np.uint32).astype(np.uint64)
    out = np.zeros((rows, w.shape[1]), dtype=np.int64)
    for i in range(rows):
        for b in range(bits):
            pos = i * bits + b
            out[i] |= (((w[pos // 32] >> np.uint64(pos % 32)) & np.uint64(1)) << np.uint64(b)).astype(np.int64)
    return out


def test_hand_packing_matches_published_vectors():
    # symmetric 4-bit zero 8, stored by v1 as 7: the well-known 0x77777777 words
    assert hand_pack(np.full((8, 1), 7), 4).view(np.uint32)[0, 0] == 0x77777777
    # 3-bit: code 10 puts bits 0-1 at the top of word 0 and bit 2 at the bottom of word 1
    v = np.zeros((32, 1), dtype=np.int64)
    v[10] = 0b101
    w = hand_pack(v, 3).view(np.uint32)
    assert w[0, 0] == 0b01 << 30 and w[1, 0] == 1 and w[2, 0] == 0
    v[:] = 0
    v[21] = 0b110
    w = hand_pack(v, 3).view(np.uint32)
    assert w[1, 0] == 0 and w[2, 0] == 0b11  # bit 0 (0) at word 1 bit 31, bits 1-2 at word 2 bits 0-1
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 8):
        codes = rng.integers(0, 2**bits, (64, 5))
        assert np.array_equal(hand_unpack(hand_pack(codes, bits), bits, 64), codes)


# --- a GPTQ checkpoint of a tiny Llama, built by hand --------------------------------------------
def write_gptq_checkpoint(path, model, *, bits, zero_format="gptq", group_size=32, desc_act=False,
                          lm_head=False, seed=0, config_place="quantize_config.json", extra_config=None):
    """GPTQ tensors with random codes/scales/zero-points for every linear of `model` (lm_head too if
    asked), float tensors in fp16 as published checkpoints have; returns the float64 weights [out, in]
    they stand for, from the published formula W[o, i] = scales[g, o] (q[i, o] - z[g, o]), g = g_idx[i]."""
    rng = np.random.default_rng(seed)
    tensors, weights = {}, {}
    for name, mod, w in linear_modules(model):
        if name == "lm_head" and not lm_head:
            continue
        n, k = w.shape
        g = k if group_size == -1 else group_size
        groups = math.ceil(k / g)
        codes = rng.integers(0, 2**bits, (k, n))
        zeros = rng.integers(1, 2**bits + 1, (groups, n)) if zero_format == "gptq" else rng.integers(0, 2**bits, (groups, n))
        scales = (rng.random((groups, n)) * 0.02 + 0.002).astype(np.float16)
        g_idx = np.arange(k) // g
        if desc_act:
            g_idx = rng.permutation(g_idx)
        stored_zeros = zeros - 1 if zero_format == "gptq" else zeros
        tensors[f"{name}.qweight"] = torch.from_numpy(hand_pack(codes, bits))
        tensors[f"{name}.qzeros"] = torch.from_numpy(np.ascontiguousarray(hand_pack(stored_zeros.T, bits).T))
        tensors[f"{name}.scales"] = torch.from_numpy(scales)
        tensors[f"{name}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        if getattr(mod, "bias", None) is not None:
            tensors[f"{name}.bias"] = (torch.from_numpy(rng.standard_normal(n)) * 0.1).half()
        s64 = scales.astype(np.float64)
        weights[name] = (s64[g_idx] * (codes - zeros[g_idx])).T
    quantized = tuple(f"{p}." for p in weights)
    for name, t in model.state_dict().items():
        tied_head = name == "lm_head.weight" and model.config.tie_word_embeddings
        if not name.startswith(quantized) and not tied_head:
            tensors[name] = t.half() if t.is_floating_point() else t
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": False,
              "checkpoint_format": zero_format, "quant_method": "gptq", **(extra_config or {})}
    if config_place == "quantize_config.json":
        (path / "quantize_config.json").write_text(json.dumps(config))
    else:  # as transformers writes it
        from transformers import GPTQConfig

        hf = model.config.to_dict()
        hf["quantization_config"] = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=False,
                                               checkpoint_format=zero_format).to_dict()
        (path / "config.json").write_text(json.dumps(hf))
    return weights, tensors


def float64_reference(model_seed, tensors, weights, **overrides):
    """The tiny Llama in float64 with the checkpoint's float tensors and dequantized weights."""
    ref = tiny_llama(seed=model_seed, **overrides).double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name in tensors:
                p.copy_(tensors[name].double())
        for name, mod, _ in linear_modules(ref):
            if name in weights:
                mod.weight = torch.nn.Parameter(torch.from_numpy(weights[name]).clone())
                if f"{name}.bias" in tensors:
                    mod.bias.copy_(tensors[f"{name}.bias"].double())
    return ref


def check_logits(model, ref, ids):
    """Equal to the float64 reference to float rounding: at float64 (the kernels' float64 path) and
    at float32 (the kernels' float32 path)."""
    with torch.no_grad():
        expect = ref(ids).logits
        out32 = model(ids).logits
        torch.testing.assert_close(out32.double(), expect, rtol=0, atol=2e-4 * expect.abs().max().item())
        out64 = model.double()(ids).logits
        torch.testing.assert_close(out64, expect, rtol=0, atol=1e-10 * expect.abs().max().item())


@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("zero_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_load_gptq_checkpoint_matches_float64_dequantized(tmp_path, monkeypatch, bits, zero_format, desc_act):
    monkeypatch.setattr(gptq_hf, "UNPACK_COLUMNS", 48)  # several blocks of outputs per layer, the last one short
    weights, tensors = write_gptq_checkpoint(tmp_path, tiny_llama(), bits=bits, zero_format=zero_format,
                                             desc_act=desc_act, seed=bits)
    model = tiny_llama(seed=7)  # other float weights: everything must come from the checkpoint
    qcompile.load(model, tmp_path)
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.format_meta["bits"] == bits
    assert q.layout == ("int8" if bits == 8 else "int4")
    assert (q.perm is not None) == desc_act
    assert model.lm_head.weight is model.model.embed_tokens.weight  # float head stays tied
    assert model.model.norm.weight.dtype == torch.float32  # fp16 in the file, cast to the model's dtype
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    check_logits(model, float64_reference(0, tensors, weights), ids)


@pytest.mark.parametrize("bits,group_size", [(4, -1), (8, -1), (8, 32), (4, 48), (3, 64)])
def test_per_channel_unequal_groups_bias_and_quantized_head(tmp_path, bits, group_size):
    """Per channel (-1); groups that do not divide in_features (48: last group smaller, stored as
    groups of 16 with repeated scales); biases; an lm_head quantized in the checkpoint; the config in
    config.json as transformers' GPTQConfig writes it."""
    overrides = dict(attention_bias=True)
    weights, tensors = write_gptq_checkpoint(tmp_path, tiny_llama(**overrides), bits=bits, group_size=group_size,
                                             desc_act=group_size == 48, lm_head=True, seed=11,
                                             config_place="config.json")
    model = tiny_llama(seed=3, **overrides)
    qcompile.load(model, tmp_path)
    assert isinstance(model.lm_head, QuantLinear) and model.config.tie_word_embeddings is False
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    if group_size == 48:
        assert model.model.layers[0].self_attn.q_proj.format_meta["group_size"] == 16
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    check_logits(model, float64_reference(0, tensors, weights, **overrides), ids)


def _rewrite(path, change):
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_bad_gptq_checkpoints_fail_clearly(tmp_path):
    model = tiny_llama()
    write_gptq_checkpoint(tmp_path, model, bits=4)
    q = "model.layers.0.self_attn.q_proj"

    def odd_groups(t):  # groups of 3 and 125 channels: no even equal-size storage exists
        t[f"{q}.g_idx"] = torch.cat([torch.zeros(3), torch.ones(125)]).int()
    _rewrite(tmp_path, odd_groups)
    with pytest.raises(CheckpointError, match=f"{q}: its groups .* cannot be loaded without dequantizing"):
        qcompile.load(tiny_llama(), tmp_path)

    write_gptq_checkpoint(tmp_path, model, bits=4)
    _rewrite(tmp_path, lambda t: t.__setitem__(f"{q}.g_idx", torch.full((128,), 9, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="g_idx names groups 9..9, but scales has 4"):
        qcompile.load(tiny_llama(), tmp_path)

    write_gptq_checkpoint(tmp_path, model, bits=4)
    _rewrite(tmp_path, lambda t: t.__setitem__(f"{q}.qweight", t[f"{q}.qweight"][:-1].contiguous()))
    with pytest.raises(CheckpointError, match="fits no GPTQ code width"):
        qcompile.load(tiny_llama(), tmp_path)

    write_gptq_checkpoint(tmp_path, model, bits=4)
    _rewrite(tmp_path, lambda t: t.pop(f"{q}.qzeros"))
    with pytest.raises(CheckpointError, match="no qzeros"):
        qcompile.load(tiny_llama(), tmp_path)

    write_gptq_checkpoint(tmp_path, model, bits=4, extra_config={"bits": 3})
    with pytest.raises(CheckpointError, match="holds 4-bit codes, but .* says bits=3"):
        qcompile.load(tiny_llama(), tmp_path)
    write_gptq_checkpoint(tmp_path, model, bits=4, extra_config={"quant_method": "awq"})
    with pytest.raises(CheckpointError, match="quant_method 'awq'"):
        qcompile.load(tiny_llama(), tmp_path)
    write_gptq_checkpoint(tmp_path, model, bits=4, extra_config={"checkpoint_format": "marlin"})
    with pytest.raises(CheckpointError, match="'marlin' keeps weights in a kernel-specific layout"):
        qcompile.load(tiny_llama(), tmp_path)

    write_gptq_checkpoint(tmp_path, model, bits=4)
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.* other layer sizes"):
        qcompile.load(tiny_llama(intermediate_size=192), tmp_path)  # down_proj: 192 inputs in the model
    with pytest.raises(CheckpointError, match="another architecture"):
        qcompile.load(tiny_llama(num_key_value_heads=4), tmp_path)  # k_proj: 128 outputs in the model
    (tmp_path / "quantize_config.json").unlink()
    with pytest.raises(CheckpointError, match="neither a checkpoint written by qcompile.save nor a GPTQ checkpoint"):
        qcompile.load(tiny_llama(), tmp_path)


# --- writing GPTQ checkpoints ------------------------------------------------------------------
def decode_with_reference(tensors, name, bits, zero_format, k, n):
    """A layer of a written checkpoint decoded by the test's own per-bit reader: float64 [out, in]."""
    codes = hand_unpack(tensors[f"{name}.qweight"].numpy(), bits, k)
    zeros = hand_unpack(np.ascontiguousarray(tensors[f"{name}.qzeros"].numpy().T), bits, n).T
    zeros = zeros + (1 if zero_format == "gptq" else 0)
    g_idx = tensors[f"{name}.g_idx"].numpy().astype(np.int64)
    s = tensors[f"{name}.scales"].numpy().astype(np.float64)
    assert tensors[f"{name}.scales"].dtype == torch.float16 and tensors[f"{name}.qweight"].dtype == torch.int32
    return (s[g_idx] * (codes - zeros[g_idx])).T


@pytest.mark.parametrize("zero_format", ["gptq", "gptq_v2"])
def test_save_gptq_round_trip_is_exact_and_follows_the_format(tmp_path, zero_format):
    model = tiny_llama()
    qcompile.quantize(model, RTNConfig(search="minmax", sym=True), progress=False)  # integer zero-points
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    expected = model(ids).logits
    qcompile.save(model, tmp_path, format=zero_format)

    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            w = lowering.unpack(mod.packed_weight())
            ref = decode_with_reference(tensors, name, w.bits, zero_format, mod.in_features, mod.out_features)
            np.testing.assert_array_equal(ref, w.dequantize(torch.float64).numpy())
    qz = tensors["model.layers.0.mlp.up_proj.qzeros"]
    want = 0x77777777 if zero_format == "gptq" else 0x88888888  # symmetric 4-bit: zero 8
    assert torch.all(qz.to(torch.int64) & 0xFFFFFFFF == want)
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (4, 64, True, False)
    assert config["checkpoint_format"] == zero_format and config["quant_method"] == "gptq"
    assert config["dynamic"] == {"+:^lm_head$": {"bits": 8, "group_size": -1}}  # the int8 head
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"] == config
    assert "model.embed_tokens.weight" in tensors  # the tied int8 table, written as the float table it reads

    from transformers import GPTQConfig  # transformers reads the config as written

    hf = GPTQConfig.from_dict(config)
    assert (hf.bits, hf.group_size, hf.sym, hf.desc_act, hf.format) == (4, 64, True, False, zero_format)

    fresh = tiny_llama(seed=9)
    qcompile.load(fresh, tmp_path)
    assert torch.equal(fresh(ids).logits, expected)
    assert isinstance(fresh.model.embed_tokens, QuantEmbedding)  # the float table was the int8 head's: shared again


def test_save_gptq_act_order_layer_writes_g_idx(tmp_path):
    gen = torch.Generator().manual_seed(4)
    n, k, g = 64, 128, 32
    w = Int4Weight(pack_nibbles(torch.randint(0, 8, (n, k), generator=gen)),
                   (torch.rand(n, k // g, generator=gen) * 0.01 + 0.001).half(),
                   torch.randint(1, 9, (n, k // g), generator=gen).half(), g, bits=3,
                   perm=torch.randperm(k, generator=gen))
    model = torch.nn.Sequential(torch.nn.Linear(k, n))
    model[0] = QuantLinear(lowering.pack(w, "cpu"), torch.randn(n))
    qcompile.save(model, tmp_path, format="gptq")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(tensors["0.g_idx"][w.perm.long()], (torch.arange(k) // g).int())
    np.testing.assert_array_equal(decode_with_reference(tensors, "0", 3, "gptq", k, n), w.dequantize(torch.float64).numpy())
    assert json.loads((tmp_path / "quantize_config.json").read_text())["desc_act"] is True
    fresh = torch.nn.Sequential(torch.nn.Linear(k, n))
    qcompile.load(fresh, tmp_path)
    back = lowering.unpack(fresh[0].packed_weight())
    assert torch.equal(back.dequantize(torch.float64), w.dequantize(torch.float64)) and back.bits == 3
    assert torch.equal(fresh[0].bias, model[0].bias)


def test_save_gptq_refuses_layers_it_cannot_express(tmp_path):
    model = tiny_llama()
    qcompile.quantize(model, progress=False)  # default recipe: fitted, fractional zero-points
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: fractional zero-points"):
        qcompile.save(model, tmp_path, format="gptq")
    codes = torch.randint(0, 16, (64, 128))
    zero0 = Int4Weight(pack_nibbles(codes), torch.full((64, 2), 0.01).half(), torch.zeros(64, 2).half(), 64)
    layer = torch.nn.Sequential(QuantLinear(lowering.pack(zero0, "cpu")))
    with pytest.raises(ValueError, match="cannot hold 0: save with format='gptq_v2'"):
        qcompile.save(layer, tmp_path, format="gptq")
    qcompile.save(layer, tmp_path / "v2", format="gptq_v2")
    tiny_scale = Int8Weight(torch.ones(64, 128, dtype=torch.int8), torch.full((64,), 1e-9))
    with pytest.raises(ValueError, match="not all exactly representable in fp16"):
        qcompile.save(torch.nn.Sequential(QuantLinear(lowering.pack(tiny_scale, "cpu"))), tmp_path, format="gptq")
    three = Int4Weight(pack_nibbles(torch.randint(0, 8, (40, 128))), torch.ones(40, 4).half(), torch.full((40, 4), 4.0).half(), 32, bits=3)
    with pytest.raises(ValueError, match="3-bit GPTQ packs 32 codes in 3 words"):
        qcompile.save(torch.nn.Sequential(QuantLinear(lowering.pack(three, "cpu"))), tmp_path, format="gptq")
    with pytest.raises(ValueError, match="format='awq'"):
        qcompile.save(layer, tmp_path, format="awq")


# --- against GPTQModel (optional: pip install gptqmodel) -------------------------------------------
def _gptqmodel_linear():
    try:
        from gptqmodel.nn_modules.qlinear import torch as gptqmodel_torch
    except Exception:  # not installed, or it does not import with this torch
        pytest.skip("gptqmodel is not installed here")
    # its reference torch kernel: TorchLinear in 7.x, TorchQuantLinear before
    return getattr(gptqmodel_torch, "TorchLinear", None) or gptqmodel_torch.TorchQuantLinear


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_round_trip_with_gptqmodel_torch_kernel(bits, desc_act):
    """GPTQModel packs a layer (its reference CPU path, internal zero format = gptq_v2): qcompile reads
    it exactly; qcompile writes a layer: GPTQModel dequantizes and runs it to the same numbers."""
    TorchQuantLinear = _gptqmodel_linear()
    from qcompile.formats import gptq_hf

    gen = torch.Generator().manual_seed(bits)
    k, n, g = 128, 64, 32
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.01 + 0.001).half()
    zeros = torch.randint(0, 2**bits, (n, k // g), generator=gen)
    g_idx = torch.arange(k) // g
    if desc_act:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    w64 = scales.double()[:, g_idx] * (codes - zeros[:, g_idx])
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = w64.float()
    theirs = TorchQuantLinear(bits=bits, group_size=g, sym=False, desc_act=desc_act, in_features=k,
                              out_features=n, bias=False, pack_dtype=torch.int32)
    theirs.pack_original(linear, scales.float(), zeros.float(), g_idx.int())
    tensors = {t: getattr(theirs, t) for t in gptq_hf.TENSOR_NAMES}
    ours = gptq_hf.to_qcompile(tensors, bits, "gptq_v2", g, k, n, "layer")
    assert torch.equal(ours.dequantize(torch.float64), w64)

    mine, _, _ = gptq_hf.from_qcompile(ours, "gptq_v2", "layer")
    back = TorchQuantLinear(bits=bits, group_size=g, sym=False, desc_act=desc_act, in_features=k,
                            out_features=n, bias=False, pack_dtype=torch.int32)
    for t, v in mine.items():
        setattr(back, t, v)
    back.post_init()
    # it dequantizes in fp16: the exact weight, rounded once
    torch.testing.assert_close(back.dequantize_weight().double().t(), w64.half().double(), rtol=0, atol=0)
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(back(x.half()).double(), (x.half().double() @ w64.t()), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(QuantLinear(lowering.pack(ours, "cpu"))(x).double(), x.double() @ w64.t(),
                               rtol=1e-4, atol=1e-4)


def test_gptqmodel_loads_a_saved_model_to_the_same_logits(tmp_path):
    """The whole exported folder (act_order layer, int8 lm_head as a `dynamic` override, gptq_v2)
    loaded by GPTQModel on CPU gives qcompile's logits up to its fp16 arithmetic."""
    _gptqmodel_linear()
    from gptqmodel import BACKEND, GPTQModel

    from tests.conftest import tiny_tokenizer

    model = tiny_llama()
    qcompile.quantize(model, RTNConfig(search="minmax"), progress=False)
    down = model.model.layers[0].mlp.down_proj
    w = lowering.unpack(down.packed_weight())
    perm = torch.randperm(w.in_features, generator=torch.Generator().manual_seed(0))
    model.model.layers[0].mlp.down_proj = QuantLinear(lowering.pack(
        Int4Weight(w.qweight, w.scales, w.zeros, w.group_size, 4, perm), "cpu"))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = model(ids).logits
    qcompile.save(model, tmp_path, format="gptq_v2")
    tiny_tokenizer().save_pretrained(tmp_path)
    theirs = GPTQModel.load(str(tmp_path), backend=BACKEND.GPTQ_TORCH, device="cpu", dtype=torch.float16)
    with torch.no_grad():
        out = theirs.model(ids).logits.float()
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-3 * expected.abs().max().item())


def test_a_meta_model_loads_a_gptq_checkpoint_and_computes_its_rotary_buffers(tmp_path):
    """A GPTQ file does not hold non-persistent buffers (rotary inv_freq): a skeleton built on the
    meta device gets them from its rotary module rebuilt on CPU, and gives the real model's logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tiny_llama(rope_theta=5e5)
    qcompile.quantize(model, RTNConfig(search="minmax"), progress=False)
    qcompile.save(model, tmp_path, format="gptq")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(5))
    expected = model(ids).logits
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "tie_word_embeddings": True})).eval()
    qcompile.load(skeleton, tmp_path)
    inv_freq = skeleton.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and torch.equal(inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(skeleton(ids).logits, expected)
