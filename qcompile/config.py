"""Configuration objects: one dataclass per quantization method, separate from the kernels.

A config says *what* to do to a model (bits, groups, which layers); the formats and kernels
that serve it live in `qcompile.formats` and `qcompile.lowering`.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch

# Group sizes every int4 kernel (CPU and Triton) serves.
INT4_GROUP_SIZES = (32, 64, 128, 256)
CPU_ACTIVATIONS = ("int8", "float")  # QuantConfig.cpu_activations


@dataclass(frozen=True)
class QuantConfig:
    """Settings shared by every method.

    Attributes:
        lm_head: quantize the output projection (``lm_head``) too. It is the largest single matrix
            of a small model, so it matters for speed and size.
        lm_head_bits: 8 (default: per-channel int8, the layer most sensitive to quantization, as
            llama.cpp's mixes also keep it wider) or 4 (the method's own int4 grid). A tied input
            embedding then reads the same int8 table.
        skip: fnmatch patterns of module paths (``"model.layers.0.*"``) that stay in float.
        int8: fnmatch patterns of module paths quantized to int8 per channel (symmetric,
            data-free) instead of the method's grid: a mix, as llama.cpp's k-quant mixes keep some
            blocks wider. `default_config` keeps a language model's last decoder block at int8.
        min_features: linears with fewer input or output features stay in float (too small to gain).
        scale_dtype: storage dtype of scales (zero-points, in code units, are kept in fp16).
        cpu_activations: what decode-size inputs (at most 8 rows) of int4 layers and of an int8
            lm_head are multiplied as on CPU: ``"int8"`` (default) quantizes them to int8 per group
            of the weight's features (per 64 for the lm_head) and runs integer dot products (W4A8 /
            W8A8, as llama.cpp does); ``"float"`` keeps float32 activations (W4A16). Larger inputs
            (prefill), other int8 layers and other devices run float activations
            (`cpu_activations_for`). On SmolLM2-135M: faster decode at a perplexity within 1% of
            float activations' (benchmarks/results/w4a8_cpu.md).
    """

    lm_head: bool = True
    lm_head_bits: int = 8
    skip: tuple[str, ...] = ()
    int8: tuple[str, ...] = ()
    min_features: int = 32
    scale_dtype: torch.dtype = torch.bfloat16
    cpu_activations: str = "int8"

    method = "base"
    needs_calibration = False  # True: only `qcompile.quantize(..., calibration=...)` can apply it

    def __post_init__(self):
        # group_size=-1 is per channel in GPTQ checkpoints, AutoGPTQ and GPTQModel: the same as None
        if hasattr(self, "group_size"):
            object.__setattr__(self, "group_size", per_channel_as_none(self.group_size))

    def validate(self) -> None:
        if self.lm_head_bits not in (4, 8):
            raise ValueError(f"{type(self).__name__}(lm_head_bits={self.lm_head_bits}): use 4 or 8")
        if self.scale_dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(
                f"{type(self).__name__}.scale_dtype={self.scale_dtype} is not supported: "
                "use torch.bfloat16, torch.float16 or torch.float32"
            )
        if self.cpu_activations not in CPU_ACTIVATIONS:
            raise ValueError(f"{type(self).__name__}(cpu_activations={self.cpu_activations!r}): use 'int8' "
                             "(int8 activations for CPU decode, the default) or 'float' (float activations)")

    def skip_reason(self, path: str) -> str | None:
        """Why the linear at module path `path` stays in float, or None if the config wants it quantized."""
        if not self.lm_head and is_output_head(path):
            return "lm_head=False in the config"
        for pattern in self.skip:
            if fnmatch.fnmatchcase(path, pattern):
                return f"matches skip pattern {pattern!r}"
        return None

    def int8_reason(self, path: str) -> str | None:
        """Why the linear at `path` is int8 per channel rather than the method's grid, or None."""
        if is_output_head(path) and self.lm_head_bits == 8:
            return "int8 per channel, symmetric"
        for pattern in self.int8:
            if fnmatch.fnmatchcase(path, pattern):
                return f"int8 per channel, symmetric (matches int8 pattern {pattern!r})"
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["method"] = self.method
        d["scale_dtype"] = str(self.scale_dtype).removeprefix("torch.")
        d["skip"] = list(self.skip)
        d["int8"] = list(self.int8)
        return d

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        d = dict(d)
        cls = CONFIGS[d.pop("method")]
        d["scale_dtype"] = getattr(torch, d["scale_dtype"])
        if "table_dtype" in d:
            d["table_dtype"] = getattr(torch, d["table_dtype"])
        d["skip"] = tuple(d.get("skip", ()))
        d["int8"] = tuple(d.get("int8", ()))
        if "w8a8" in d:
            d["w8a8"] = tuple(d["w8a8"])
        return cls(**d)


@dataclass(frozen=True)
class RTNConfig(QuantConfig):
    """Data-free weight-only quantization (round to nearest on a fitted grid).

    Attributes:
        bits: weight bits: 4 (int4 in groups) or 8 (int8 per output channel, symmetric; group_size,
            sym and search do not apply).
        group_size: input channels per scale/zero-point: 32, 64, 128, 256, or None (or -1, as GPTQ
            checkpoints write it) for one group per output channel. When it does not divide a layer's input features, the largest supported
            size that does is used and the report says so.
        sym: symmetric grid (zero-point fixed at the middle code) instead of asymmetric.
        search: how the grid of each group is fitted, all data-free:
            ``"minmax"`` classic round-to-nearest: [min, max] widened to hold 0, integer zero-point;
            ``"hqq"`` (default) refines scale and zero-point by half-quadratic splitting on an
            Lp error, p = 0.7 (see `qcompile.methods.rtn`): better accuracy at no runtime cost.
        norm_weighting: weight each input channel's error by the squared gain of the norm that
            feeds the layer (read from the graph; data-free). Layers fed by no norm are unweighted.
    """

    bits: int = 4
    group_size: int | None = 64
    sym: bool = False
    search: str = "hqq"
    norm_weighting: bool = True

    method = "rtn"

    def validate(self) -> None:
        super().validate()
        if self.bits not in (4, 8):
            raise ValueError(
                f"RTNConfig(bits={self.bits}) is not supported: use 4 (int4 groups) or 8 (int8 per "
                "channel); 2/3-bit weights come with GPTQConfig"
            )
        if self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"RTNConfig(group_size={self.group_size}) is not supported: use one of "
                f"{INT4_GROUP_SIZES} or None / -1 (per output channel)"
            )
        if self.search not in ("minmax", "hqq"):
            raise ValueError(f"RTNConfig(search={self.search!r}): use 'minmax' or 'hqq'")


GPTQ_BITS = (2, 3, 4, 8)


def check_calibration_fields(config: QuantConfig, positive: tuple[str, ...], flags: tuple[str, ...]) -> None:
    """The checks calibrated methods share: damp_percent in (0, 1), positive integers, booleans."""
    name = type(config).__name__
    if not 0 < config.damp_percent < 1:
        raise ValueError(f"{name}(damp_percent={config.damp_percent}): use a fraction of the mean "
                         "Hessian diagonal in (0, 1), e.g. 0.01")
    for field in positive:
        v = getattr(config, field)
        if field == "nsamples" and v is None:  # automatic (CalibratedConfig.samples)
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}({field}={v!r}): must be a positive integer")
    for field in flags:
        if not isinstance(getattr(config, field), bool):
            raise ValueError(f"{name}({field}={getattr(config, field)!r}): must be True or False")
    if config.float_targets not in (None, True, False):
        raise ValueError(f"{name}(float_targets={config.float_targets!r}): must be None (automatic), True or False")


@dataclass(frozen=True)
class CalibratedConfig(QuantConfig):
    """Settings of the block-by-block calibration pass (`qcompile.methods.calibration`) that GPTQ and
    GANQ share; see `GPTQConfig` for what each one does."""

    true_sequential: bool = True
    nsamples: int | None = None
    seqlen: int = 512
    batch_size: int = 8
    float_targets: bool | None = None

    needs_calibration = True

    @property
    def samples(self) -> int:
        """nsamples as applied: None means 64 windows for GPTQ per-channel grids at 3 bits and
        below, 32 otherwise."""
        if self.nsamples is not None:
            return self.nsamples
        return 64 if isinstance(self, GPTQConfig) and self.bits <= 3 and self.group_size is None else 32

    @property
    def uses_float_targets(self) -> bool:
        """float_targets as applied: None means on for GPTQ at 3 bits and below, off otherwise."""
        if self.float_targets is None:
            return isinstance(self, GPTQConfig) and self.bits <= 3
        return self.float_targets


@dataclass(frozen=True)
class GPTQConfig(CalibratedConfig):
    """GPTQ (Frantar et al., 2023): error-compensating quantization from calibration data.

    Applied by ``qcompile.quantize(model, GPTQConfig(...), calibration=...)`` (calibration may be
    omitted: a small English text ships with qcompile), then ``torch.compile`` as usual.

    Attributes:
        bits: 2, 3 or 4 (stored as 4-bit codes, served by the int4 kernels) or 8.
        group_size: 32, 64, 128, 256, or None (or -1, as GPTQ checkpoints write it) for one grid per
            output channel. When it does not
            divide a layer's input features, the largest supported size that does is used and the
            report says so (SmolLM2's 576-wide inputs get 64 for 128).
        sym: symmetric grid (zero-point 2^(bits-1)) instead of min/max with a fitted integer zero.
        act_order: quantize input channels in order of decreasing Hessian diagonal (the largest
            inputs first): better accuracy, at the cost of one gather of the input per matmul.
        static_groups: fit every group's grid before quantizing, on the original column blocks, so
            groups stay contiguous in the layer's input order (no gather needed for act_order).
        damp_percent: Hessian damping as a fraction of its mean diagonal; raised ×10 for a layer
            whose Cholesky factorisation fails (the report gives what was used). 0.01, as in the
            reference, chosen on calibration data alone (`benchmarks/bench_damping.py`: output error
            on held-out calibration windows is lowest at 0.01 of 0.01/0.1/0.3 at W4 g64, W3 g64 and
            W3 per channel) and confirmed on the development set's tune split
            (`benchmarks/tune_gptq.py`). (0.3, the earlier default, had been chosen on the
            evaluation text itself and did not hold off it.)
        block_size: columns per lazy update block (speed only; the result is the same).
        clip_search: search a shrunk grid per group (p = 1 − i/100, i < 80) on an L2.4 error. On
            by default: on SmolLM2 (W4 g64) it took perplexity from 26.2 to 23.2 (min/max grid:
            GPTQ's error feedback cannot undo a range stretched by one outlier).
        true_sequential: inside each decoder block, quantize the layers that read one input
            together and recompute the next layers' inputs through the quantized ones
            ([q,k,v] → [o] → [gate,up] → [down] in a Llama block).
        nsamples, seqlen: calibration windows taken from the calibration text (token tensors
            are used as given) x their length in tokens. nsamples None (default): 32, or 64 for a
            per-channel grid at 3 bits and below, whose one grid per row leaves all the work to
            error feedback and so to the Hessian estimate (SmolLM2 W3 per channel on the
            development set's tune split, shipped text: 2.05x float at 32 windows, 1.94x at 64;
            benchmarks/tune_gptq.py); an automatic count never repeats tokens, so a text too short
            for it gives fewer windows (the report says so). Windows held out from a text for the
            check against round to nearest (one in nine) never share a token with fitted ones.
            Time grows with the count.
        batch_size: calibration windows per forward pass (memory only).
        float_targets: fit each layer to the float model's outputs instead of its own on the
            quantized model's inputs (asymmetric calibration, the idea of GPTAQ / GPTQModel v2):
            before GPTQ, W becomes W* = W + W (C − H)(H + λI)⁻¹ with C = E[x_float x_quantᵀ], the
            ridge least-squares fix for the error the layers quantized before it left in its
            input. A float copy of each block runs beside it, which costs time (about 2x). None
            (default): on at 3 bits and below, where plain GPTQ's error builds up block after block
            (SmolLM2 3-bit per channel: collapse, perplexity in the hundreds, without it; within
            2x of float with it), off at 4 and 8 bits.
    """

    bits: int = 4
    group_size: int | None = 128
    sym: bool = True
    act_order: bool = True
    static_groups: bool = False
    damp_percent: float = 0.01
    block_size: int = 128
    clip_search: bool = True

    method = "gptq"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.bits not in GPTQ_BITS:
            raise ValueError(f"{name}(bits={self.bits}) is not supported: use one of {GPTQ_BITS}")
        if self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"{name}(group_size={self.group_size}) is not supported: use one of "
                             f"{INT4_GROUP_SIZES} or None / -1 (per output channel)")
        check_calibration_fields(self, ("block_size", "nsamples", "seqlen", "batch_size"),
                                 ("sym", "act_order", "static_groups", "clip_search", "true_sequential"))


@dataclass(frozen=True)
class GANQConfig(CalibratedConfig):
    """GANQ (Zhao & Yuan, ICML 2025): a lookup table of 2^bits values per output row, fitted to
    calibration data by alternating a closed-form table update and back-substitution code
    assignment (`qcompile.methods.ganq`). Served by `qcompile::lut_mm` (LUT-mpGEMM).

    Applied by ``qcompile.quantize(model, GANQConfig(...), calibration=...)`` (calibration may be
    omitted: qcompile's default text is used), with the same block-by-block calibration as GPTQ;
    layers that read one input (q/k/v, gate/up) are fitted in one batched call.

    Attributes:
        bits: 3 or 4 (codes stored as 4-bit nibbles in memory, packed densely in files).
        iters: alternating rounds (the paper's K); the lowest-error iterate is kept.
        damp_percent: added to H's diagonal, as a fraction of its mean, before the Cholesky
            factorisation of the S-step (raised ×10 if H is still not positive definite).
        table_dtype: dtype of the tables (torch.float16 or torch.bfloat16).
        outlier_fraction: GANQ*'s sparse float part (e.g. 0.005). Not implemented yet: values
            above 0 raise NotImplementedError, since no kernel serves the sparse part.
        true_sequential, nsamples, seqlen, batch_size, float_targets: as in `GPTQConfig`.
    """

    bits: int = 4
    iters: int = 10
    damp_percent: float = 0.01
    table_dtype: torch.dtype = torch.float16
    outlier_fraction: float = 0.0

    method = "ganq"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.bits not in (3, 4):
            raise ValueError(f"{name}(bits={self.bits}) is not supported: use 3 or 4")
        if not isinstance(self.iters, int) or isinstance(self.iters, bool) or self.iters < 0:
            raise ValueError(f"{name}(iters={self.iters!r}): must be a non-negative integer")
        check_calibration_fields(self, ("nsamples", "seqlen", "batch_size"), ("true_sequential",))
        if self.table_dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{name}(table_dtype={self.table_dtype}): use torch.float16 or torch.bfloat16")
        if self.outlier_fraction:
            raise NotImplementedError(
                f"{name}(outlier_fraction={self.outlier_fraction}): the outlier variant GANQ* is not "
                "implemented (no kernel serves a sparse float part yet); use outlier_fraction=0")

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["table_dtype"] = str(self.table_dtype).removeprefix("torch.")
        return d


@dataclass(frozen=True)
class QUIKConfig(CalibratedConfig):
    """QUIK (Ashkboos et al., EMNLP 2024): 4-bit weights and 4-bit activations, with the few input
    channels whose activations are largest kept in float ("outlier columns").

    Applied by ``qcompile.quantize(model, QUIKConfig(), calibration=...)`` (calibration may be
    omitted: qcompile's default text is used). Calibration records each layer's per-input-channel
    max|x| and Hessian; the `outliers` channels with the largest max|x| stay float, and GPTQ
    quantizes the other columns on a symmetric grid, processing the outlier columns last so that
    they absorb the rounding error. At run time activations are quantized per token (asymmetric,
    `qcompile.ops.quik.quantize_activations`) and multiplied in integers (`qcompile::quik_mm`).

    Attributes:
        bits: weight bits of the integer part (4; 8 is what `w8a8` layers get).
        act_bits: activation bits (4 or 8), per token, asymmetric.
        outliers: float columns per layer: a fraction of the layer's input features (a float < 1),
            or a count (an int). QUIK's 256 columns are 6% of a 4096-wide model; a fraction scales
            to the layer. Rounded up so the integer columns split into whole weight groups. The
            default 0.1 (and group_size 32) is the best of {0.02, 0.05, 0.1} x {per channel, 32}
            on the development set's tune split (`benchmarks/bench_quik.py --split tune`).
        w8a8: fnmatch patterns of module paths run with 8-bit weights and activations (QUIK's
            ``--int8_down_proj``: down_proj's inputs, after the gated activation, have the widest
            range) with twice the outlier columns.
        group_size: 32 (default), 64, 128, 256: a weight scale per group of integer columns, the
            kernel's int32 sums scaled per group as llama.cpp's blocks are; None (or -1) for one
            scale per output channel (QUIK's own choice: on SmolLM2 1.21x float32's perplexity
            against 1.13x with groups of 32, tune split).
        clip_search, damp_percent, block_size: GPTQ's, see `GPTQConfig`.
        true_sequential, nsamples, seqlen, batch_size: as in `GPTQConfig`.
    """

    bits: int = 4
    act_bits: int = 4
    outliers: float | int = 0.1
    w8a8: tuple[str, ...] = ("*.down_proj", "*.fc2")
    group_size: int | None = 32
    clip_search: bool = True
    damp_percent: float = 0.01
    block_size: int = 128

    method = "quik"

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"{name}(bits={self.bits}) is not supported: use 4 (or 2, 3, 8)")
        if self.act_bits not in (4, 8):
            raise ValueError(f"{name}(act_bits={self.act_bits}) is not supported: use 4 or 8")
        if self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"{name}(group_size={self.group_size}) is not supported: use one of "
                             f"{INT4_GROUP_SIZES} or None / -1 (per output channel)")
        o = self.outliers
        if isinstance(o, bool) or not isinstance(o, (int, float)) or o < 0 or (isinstance(o, float) and o >= 1):
            raise ValueError(f"{name}(outliers={o!r}): use a fraction of the input features in [0, 1) "
                             "(e.g. 0.05) or a whole number of columns (e.g. 32)")
        check_calibration_fields(self, ("block_size", "nsamples", "seqlen", "batch_size"),
                                 ("clip_search", "true_sequential"))
        if self.lm_head and self.lm_head_bits != 8:
            raise ValueError(f"{name}(lm_head_bits={self.lm_head_bits}): QUIK keeps the lm_head out of the "
                             "integer GEMMs: use lm_head_bits=8 (int8 weights, the default) or lm_head=False")

    def is_w8a8(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.w8a8)

    def layer_bits(self, path: str) -> tuple[int, int]:
        """(weight bits, activation bits) of the layer at `path`."""
        return (8, 8) if self.is_w8a8(path) else (self.bits, self.act_bits)

    def outlier_count(self, path: str, in_features: int) -> int:
        """Float columns of the layer at `path`, before rounding to whole groups."""
        k = round(self.outliers * in_features) if isinstance(self.outliers, float) else self.outliers
        return min(2 * k if self.is_w8a8(path) else k, in_features)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["w8a8"] = list(self.w8a8)
        return d


@dataclass(frozen=True)
class DLQATConfig(QuantConfig):
    """DL-QAT (Ke et al., EMNLP 2024 Industry): low-rank quantization-aware training of a 2-4 bit
    grid, merged into the plain int4 format (`qcompile.qat`, which documents the exact form).

    Applied by ``qcompile.quantize(model, DLQATConfig(...), calibration=...)`` (calibration may be
    omitted: the text that ships with qcompile is used), or step by step with
    `qcompile.qat.prepare` / `train` / `convert`. Per int4 layer, only a magnitude per group (the
    group's step is m·s0) and LoRA factors inside the rounding are trained; everything else is frozen.
    The model is distilled from its own float copy (KL divergence on the logits).

    Attributes:
        bits: 2, 3 or 4 (stored as 4-bit codes, served by the int4 kernels).
        group_size: 32, 64, 128, 256, or None (-1) for one grid per output channel.
        rank: LoRA rank per layer (the factors are [out, rank] and [rank, in]); 0 trains magnitudes only.
        lora_alpha: the LoRA term is (lora_alpha / rank)·B·A, in code units.
        init: the post-training grid training starts from: ``"gptq"`` (GPTQ with act_order, the
            `GPTQConfig` defaults otherwise; its permutation is kept) or ``"rtn"`` (round to nearest
            on GPTQ's min/max grid with clip search; data-free, seconds).
        sym: symmetric initial grid. Asymmetric by default; zero-points are integers either way.
        scale_dtype: float16 by default (QuantConfig's bfloat16 has 8 bits of mantissa: a magnitude
            would move in 0.4% steps; float16 gives 0.05%).
        steps: optimizer steps (each `batch_size` windows of `seqlen` tokens). 100 keeps the default
            recipe (GPTQ init, teacher pass, training, convert) under 30 minutes on 2 Zen4 cores for
            SmolLM2-135M (~9.5 s a step in bf16, 13 s in float32), about one pass over the default
            text; the held-out KL was still falling at the end of 75 steps.
        batch_size, seqlen: windows per step and their length in tokens.
        lr: learning rate of the LoRA factors (AdamW, betas 0.9/0.95, warm-up then cosine decay).
            The LoRA term is in code units: a code moves only when B·A crosses a rounding boundary.
            From GPTQ's grid, whose codes already compensate each other's error, flipping codes early
            hurts (1e-2 and up raise the held-out KL); from RTN's, 3e-2 helps most.
        magnitude_lr: learning rate of the per-group magnitudes (relative units: they start at 1).
            Both rates (and lora_alpha = rank) were chosen by `benchmarks/tune_qat.py` on the held-out
            tenth of the shipped calibration text (W3 g64, GPTQ init, 20 steps), never on evaluation text:
            `benchmarks/results/tune_qat.md` (RTN init: `tune_qat_rtn.md`; with `init="rtn"` raise lr to
            3e-2 and magnitude_lr to 3e-3).
        heldout: fraction of the training windows held out (every 1/heldout-th, at most 16 spread
            over the text); the state with the lowest held-out KL divergence (checked every
            `eval_every` steps) is the one kept.
        distill_topk: the float model's top-k log-probabilities per token are cached once; the loss
            is the KL divergence over those k tokens plus one bucket for the rest of the vocabulary.
        seed: seeds the LoRA initialisation and the order of training windows.
        compile: build each layer's fake-quantized weight with a `torch.compile`d function
            (fuses round/clamp/scale into one pass, forward and backward).
        train_precision: the matmuls of the training steps: ``"auto"`` (default) runs them under
            bf16 autocast where the device multiplies bf16 natively (CUDA; CPUs with AVX512-BF16 or
            AMX: 1.35x faster a step on 2 Zen4 cores, `benchmarks/results/qat_step_time.md`) and in
            float32 otherwise; ``"float32"`` or ``"bfloat16"`` force one. The fake-quantized weights,
            the teacher, the held-out KL that picks the kept state and the deployed model stay float32.
    """

    bits: int = 4
    group_size: int | None = 64
    rank: int = 8
    lora_alpha: float = 8.0
    init: str = "gptq"
    scale_dtype: torch.dtype = torch.float16
    sym: bool = False
    steps: int = 100
    batch_size: int = 4
    seqlen: int = 512
    lr: float = 3e-3
    magnitude_lr: float = 1e-3
    heldout: float = 0.1
    eval_every: int = 20
    distill_topk: int = 64
    seed: int = 0
    compile: bool = True
    train_precision: str = "auto"

    method = "dlqat"
    needs_calibration = True

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__
        if self.bits not in (2, 3, 4):
            raise ValueError(f"{name}(bits={self.bits}) is not supported: use 2, 3 or 4")
        if self.group_size is not None and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"{name}(group_size={self.group_size}) is not supported: use one of "
                             f"{INT4_GROUP_SIZES} or None / -1 (per output channel)")
        if self.init not in ("gptq", "rtn"):
            raise ValueError(f"{name}(init={self.init!r}): use 'gptq' or 'rtn'")
        for field in ("steps", "batch_size", "seqlen", "eval_every", "distill_topk"):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}({field}={v!r}): must be a positive integer")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            raise ValueError(f"{name}(rank={self.rank!r}): must be a non-negative integer (0: magnitudes only)")
        for field in ("lr", "magnitude_lr"):
            if not getattr(self, field) >= 0:
                raise ValueError(f"{name}({field}={getattr(self, field)!r}): must be >= 0")
        if not 0 < self.heldout < 1:
            raise ValueError(f"{name}(heldout={self.heldout!r}): a fraction of the training windows in (0, 1)")
        if self.train_precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"{name}(train_precision={self.train_precision!r}): use 'auto', 'float32' or 'bfloat16'")

    def gptq_config(self) -> "GPTQConfig":
        """The post-training config of the initial grid (and of the layers training leaves alone)."""
        shared = {f: getattr(self, f) for f in ("lm_head", "lm_head_bits", "skip", "int8", "min_features",
                                                "scale_dtype", "cpu_activations")}
        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym, act_order=self.init == "gptq",
                          **shared)


CONFIGS: dict[str, type[QuantConfig]] = {"rtn": RTNConfig, "gptq": GPTQConfig, "ganq": GANQConfig, "quik": QUIKConfig,
                                         "dlqat": DLQATConfig}


MIN_BLOCKS_FOR_INT8_LAST = 8


def default_config(model=None) -> QuantConfig:
    """The recipe used when no config is given.

    A model that generates text (or any module that is not a Hugging Face model): data-free int4
    in groups of 64 with a fitted, norm-weighted grid, an int8 lm_head, and the last decoder block
    at int8 when there are at least 8 blocks — decode reads every weight per token, so 4 bits pay. A Hugging Face model that does not generate (an encoder,
    embedding or classification model: ``model.can_generate()`` is False): int8 per channel —
    they run batched and compute-bound, where 4 bits save little time and cost accuracy
    (all-MiniLM-L6-v2's sentence embeddings fall to cosine 0.973 of float at int4 g64)."""
    if is_encoder(model):
        return RTNConfig(bits=8)
    blocks = decoder_blocks(model)
    # The last decoder block at int8: on SmolLM2 it alone carried ~30% of int4's loss (tune split,
    # benchmarks/tune_default.py) for ~3% more decoder bytes. It costs ~0.8/count of the decoder's
    # int4 bytes, so a shallow model (fewer than 8 blocks: +10% or more) stays all int4.
    if blocks is None or blocks[1] < MIN_BLOCKS_FOR_INT8_LAST:
        return RTNConfig()
    path, count = blocks
    return RTNConfig(int8=(f"{path}.{count - 1}.*",))


def decoder_blocks(model) -> tuple[str, int] | None:
    """(path, length) of `model`'s stack of decoder blocks: its longest nn.ModuleList of
    same-typed modules (HF's model.layers, GPT-2's transformer.h), or None."""
    if not isinstance(model, torch.nn.Module):
        return None
    best = None
    for path, module in model.named_modules():
        if (isinstance(module, torch.nn.ModuleList) and len(module) > 1
                and len({type(m) for m in module}) == 1 and (best is None or len(module) > best[1])):
            best = (path, len(module))
    return best


def is_encoder(model) -> bool:
    """Whether `model` is a Hugging Face model that does not generate text (see `default_config`)."""
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and hasattr(model, "config") and not can_generate()


def is_output_head(path: str) -> bool:
    """Whether a module path names a language model's output projection."""
    return path.rsplit(".", 1)[-1] in ("lm_head", "embed_out")


def cpu_activations_for(requested: str, path: str, fmt: str | None) -> str:
    """The activations a layer at module path `path` in format `fmt` runs CPU decode with, for a
    config's cpu_activations=`requested`: int8 layers other than the lm_head keep float ones (on
    SmolLM2 the default recipe's int8 last block cost +0.19% perplexity with int8 activations, as
    much as the lm_head, for ~1/7 of its time saved: benchmarks/results/w4a8_cpu.md)."""
    if fmt == "int8" and not is_output_head(path):
        return "float"
    return requested


def per_channel_as_none(group_size: int | None) -> int | None:
    """-1 (per channel, as GPTQ checkpoints, AutoGPTQ and GPTQModel write it) as None."""
    return None if group_size == -1 else group_size


def choose_group_size(requested: int | None, in_features: int) -> tuple[int | None, str | None]:
    """(group size to use, note) for a layer: the requested size, or the largest supported one that
    divides in_features (None if none does). Per channel (None or -1) uses one group of in_features."""
    requested = per_channel_as_none(requested)
    if requested is None:
        return in_features, None
    if in_features % requested == 0:
        return requested, None
    for g in sorted(INT4_GROUP_SIZES, reverse=True):
        if g < requested and in_features % g == 0:
            return g, f"group_size {requested} does not divide in_features {in_features}: used {g}"
    return None, None


@dataclass(frozen=True)
class AttentionConfig:
    """What the attention pass does (`qcompile.backend(attention=AttentionConfig(...))`).

    Attributes:
        enabled: rewrite attention sites into `qcompile::gqa_attention` at all.
        mha: multi-head attention with no repeated K/V and no ALiBi has nothing to remove:
            ``"keep"`` (default) leaves it to SDPA / Inductor; ``"rewrite"`` sends it to the op too.
    """

    enabled: bool = True
    mha: str = "keep"

    def validate(self) -> None:
        if self.mha not in ("keep", "rewrite"):
            raise ValueError(f"AttentionConfig(mha={self.mha!r}): use 'keep' or 'rewrite'")

    def to_dict(self) -> dict:
        return asdict(self)
