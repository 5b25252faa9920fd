"""The DL-QAT training loop: distil a prepared model from its float teacher.

Text (qcompile's calibration text plus ~100k tokens more documentation by default) is cut into non-overlapping windows; every
1/heldout-th window is held out. The teacher runs once over all windows and its top-k
log-probabilities per token are kept (k = 64: ~0.5 KB a token instead of the 196 KB of a full
SmolLM2 distribution). The loss is the KL divergence from the teacher over those k tokens plus one
bucket for the rest of the vocabulary: a true KL divergence of the coarsened distributions, zero
only when the student matches them. AdamW (betas 0.9/0.95), linear warm-up over the first 5% of
steps, cosine decay to a tenth, gradient norm clipped at 1. Every `eval_every` steps the held-out
KL divergence is measured (in float32) and the best trainable state kept; the model ends in that
state, also when Ctrl-C stops training. Training steps run under bf16 autocast where the device has
native bf16 (`DLQATConfig.train_precision`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._compat import native_bfloat16
from ..methods.calibration import model_tokenizer, training_text
from .fake_quant import QATLinear


@dataclass
class TrainResult:
    """What `train` did: steps run, tokens seen, held-out KL divergence per evaluation."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best_step: int = 0
    best_heldout_kl: float = float("inf")
    initial_heldout_kl: float = float("nan")
    heldout: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out KL)
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False
    train_windows: int = 0
    heldout_windows: int = 0
    precision: str = "float32"  # of the training matmuls (bf16 autocast or not)

    def describe(self) -> str:
        return (f"{self.steps} steps ({self.precision}), {self.tokens} tokens in {self.seconds:.0f} s; best held-out KL "
                f"{self.best_heldout_kl:.4f} (step {self.best_step}; {self.initial_heldout_kl:.4f} before "
                f"training){', interrupted' if self.interrupted else ''}")


def training_windows(calibration, *, model: nn.Module, tokenizer=None, seqlen: int = 512) -> Tensor:
    """LongTensor [n, seqlen]: every non-overlapping window of the text (None: qcompile's training
    text, `qcompile.methods.calibration.training_text`; a
    text or list of texts, joined), or token ids [n, seqlen] / a list of id tensors used as given."""
    if isinstance(calibration, Tensor):
        ids = calibration.long()
        return ids if ids.dim() == 2 else ids.reshape(-1)[: ids.numel() // seqlen * seqlen].reshape(-1, seqlen)
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, Tensor) for c in calibration):
        return torch.stack([c.reshape(-1).long() for c in calibration])
    if calibration is None:
        calibration = training_text()
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, str) for c in calibration):
        calibration = "\n\n".join(calibration)
    if not isinstance(calibration, str):
        raise TypeError("DL-QAT training text must be None (qcompile's text), a text, a list of texts, a LongTensor "
                        f"[n, seqlen] or a list of token-id tensors; got {type(calibration).__name__}")
    tok = tokenizer or model_tokenizer(model)
    out = tok(calibration, return_tensors="pt")
    ids = (out["input_ids"] if isinstance(out, Mapping) else out.input_ids).reshape(-1)
    n = ids.numel() // seqlen
    if n < 2:
        raise ValueError(f"DL-QAT needs at least 2 windows of seqlen={seqlen} tokens (one to train on, one held "
                         f"out); the text has {ids.numel()} tokens: give more text or a smaller seqlen")
    return ids[: n * seqlen].reshape(n, seqlen)


HELDOUT_MAX = 16  # enough to rank states; each held-out window costs a forward pass per evaluation


def heldout_mask(count: int, fraction: float) -> Tensor:
    """bool [count]: every round(1/fraction)-th window held out (sparser when that would hold out
    more than HELDOUT_MAX), at least one."""
    every = max(2, round(1 / fraction), math.ceil(count / HELDOUT_MAX))
    held = torch.zeros(count, dtype=torch.bool)
    held[every - 1::every] = True
    if not held.any():
        held[-1] = True
    return held


@dataclass
class TeacherTargets:
    """The teacher's top-k log-probabilities [n, T, k] (float32) and their token ids (int32)."""

    logp: Tensor
    index: Tensor


@torch.no_grad()
def teacher_targets(teacher: nn.Module, windows: Tensor, k: int, batch_size: int, progress: bool) -> TeacherTargets:
    device = next(teacher.parameters()).device
    # The outputs are allocated once, up front: small tensors kept from each batch would land in the
    # hole the batch's freed logits left (qcompile keeps freed memory in the heap, qcompile/malloc.py),
    # so the next batch's logits would no longer fit there and the heap would grow by one logits
    # tensor per batch (SmolLM2: 400 MB a batch, out of memory after ~50 batches).
    logp = torch.empty(*windows.shape, k)
    index = torch.empty(*windows.shape, k, dtype=torch.int32)
    for start in tqdm(range(0, len(windows), batch_size), desc="teacher", disable=not progress, leave=False):
        logits = teacher(windows[start:start + batch_size].to(device), use_cache=False).logits.float()
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        del logits
        logp[start:start + batch_size] = top.values
        index[start:start + batch_size] = top.indices
    return TeacherTargets(logp, index)


def distill_kl(logits: Tensor, t_logp: Tensor, t_index: Tensor) -> Tensor:
    """Mean over tokens of KL(teacher || student) on the teacher's top-k tokens plus one bucket for
    the rest of the vocabulary."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    q_top = logq.gather(-1, t_index.long())
    p_top = t_logp.exp()
    p_rest = (1 - p_top.sum(-1)).clamp(min=1e-12)
    q_rest = (1 - q_top.exp().sum(-1)).clamp(min=1e-12)
    kl = (p_top * (t_logp - q_top)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.mean()


@torch.no_grad()
def heldout_kl(model: nn.Module, windows: Tensor, targets: TeacherTargets, batch_size: int) -> float:
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(windows), batch_size):
        sl = slice(start, start + batch_size)
        logits = model(windows[sl].to(device), use_cache=False).logits
        total += distill_kl(logits, targets.logp[sl].to(device), targets.index[sl].to(device)).item() * len(windows[sl])
    return total / len(windows)


def _lr_factor(step: int, steps: int) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))


def train(model: nn.Module, teacher: nn.Module, *, calibration=None, tokenizer=None, config=None,
          progress: bool = True) -> TrainResult:
    """Distil `model` (prepared by `qcompile.qat.prepare`) from `teacher` (its float original) on
    `calibration` text; see the module docstring. `config` defaults to the one `prepare` used.
    Ctrl-C stops training and keeps the best state so far. Returns a `TrainResult`; the model's
    report then says how it was trained."""
    config = config or getattr(model, "qcompile_qat_config", None)
    if config is None:
        raise ValueError("qcompile.qat.train: prepare the model with qcompile.qat.prepare first (or pass config=)")
    params = [p for m in model.modules() if isinstance(m, QATLinear)
              for p in (m.magnitude, m.lora_a, m.lora_b) if p is not None]
    if not params:
        raise ValueError("qcompile.qat.train: the model has no QATLinear layers to train (nothing was int4)")
    windows = training_windows(calibration, model=model, tokenizer=tokenizer, seqlen=config.seqlen)
    held = heldout_mask(len(windows), config.heldout)
    train_ids, held_ids = windows[~held], windows[held]
    result = TrainResult(train_windows=len(train_ids), heldout_windows=len(held_ids))
    targets = teacher_targets(teacher, windows, config.distill_topk, config.batch_size, progress)
    train_t = TeacherTargets(targets.logp[~held], targets.index[~held])
    held_t = TeacherTargets(targets.logp[held], targets.index[held])
    del targets

    lora = [p for m in model.modules() if isinstance(m, QATLinear) for p in (m.lora_a, m.lora_b) if p is not None]
    magnitudes = [m.magnitude for m in model.modules() if isinstance(m, QATLinear)]
    opt = torch.optim.AdamW([g for g in ({"params": lora, "lr": config.lr},
                                         {"params": magnitudes, "lr": config.magnitude_lr}) if g["params"]],
                            betas=(0.9, 0.95), weight_decay=0.0)
    base_lr = [g["lr"] for g in opt.param_groups]
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train_ids), generator=gen)
    device = next(model.parameters()).device
    bf16 = config.train_precision == "bfloat16" or (config.train_precision == "auto" and native_bfloat16(device))
    result.precision = "bfloat16" if bf16 else "float32"
    was_training = model.training
    model.train()

    def snapshot():
        return [p.detach().clone() for p in params]

    result.initial_heldout_kl = result.best_heldout_kl = heldout_kl(model, held_ids, held_t, config.batch_size)
    best = snapshot()
    start_time = time.perf_counter()
    cursor = 0
    bar = tqdm(range(config.steps), desc=f"dl-qat w{config.bits}{' bf16' if bf16 else ''}", disable=not progress, unit="step")
    try:
        for step in bar:
            if cursor + config.batch_size > len(order):
                order, cursor = torch.randperm(len(train_ids), generator=gen), 0
            pick = order[cursor:cursor + config.batch_size]
            cursor += config.batch_size
            for g, lr in zip(opt.param_groups, base_lr):
                g["lr"] = lr * _lr_factor(step, config.steps)
            with torch.enable_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                # enable_grad: also when called under no_grad (qcompile.quantize)
                logits = model(train_ids[pick].to(device), use_cache=False).logits
                loss = distill_kl(logits, train_t.logp[pick].to(device), train_t.index[pick].to(device))
                del logits
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            result.steps, result.tokens = step + 1, result.tokens + pick.numel() * config.seqlen
            result.losses.append(loss.item())
            result.seconds = time.perf_counter() - start_time
            if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
                kl = heldout_kl(model, held_ids, held_t, config.batch_size)
                result.heldout.append((step + 1, kl))
                if kl < result.best_heldout_kl:
                    result.best_heldout_kl, result.best_step, best = kl, step + 1, snapshot()
            bar.set_postfix(loss=f"{loss.item():.4f}", heldout=f"{result.best_heldout_kl:.4f}",
                            tok_s=f"{result.tokens / max(result.seconds, 1e-9):.0f}")
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        bar.close()
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        model.train(was_training)
        result.seconds = time.perf_counter() - start_time
        model.qcompile_qat_trained = result.describe()
    return result

