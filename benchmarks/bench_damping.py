"""GPTQ's damping chosen on calibration data alone: held-out layer output error vs damp_percent.

    python benchmarks/bench_damping.py [--blocks 0 7 15 22 29] [--damps 0.01 0.03 0.1 0.3 0.5] [--grids 4:64 3:pc]

The default calibration text is cut into 64 windows of 512 tokens; the even ones fit GPTQ (the
default's 32 x 512 tokens), the odd ones are held out. For the linears of a few SmolLM2 blocks (on
the float model's inputs) it prints, per bit width and damping, the output error on the held-out
windows, tr((W - Q) H_ho (W - Q)^T), as a fraction of round to nearest's on the same grid
(asymmetric, clip search, act_order; bits:group, pc = per channel), and the same on the fit windows (both averaged over the layers). Too little damping fits the
fit windows' Hessian and loses on the held-out ones; no evaluation text is involved.
Writes benchmarks/results/damping_smollm2.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qcompile.methods.calibration import calibration_ids
from qcompile.methods import gptq
from qcompile.tools.models import load_model

OUT = Path(__file__).parent / "results"
LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def error(w, q, h):
    r = (w - q).double()
    return (r @ h.double() * r).sum().item()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 7, 15, 22, 29])
    ap.add_argument("--damps", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3, 0.5])
    ap.add_argument("--grids", nargs="*", default=["4:64", "3:64", "4:pc", "3:pc"], help="bits:group (pc: per channel)")
    args = ap.parse_args()
    model, tok = load_model()
    rows, _, _ = calibration_ids(None, model=model, tokenizer=tok, nsamples=64, seqlen=512)
    mods = {f"model.layers.{b}.{n}": model.get_submodule(f"model.layers.{b}.{n}") for b in args.blocks for n in LAYERS}
    hess = {p: (gptq.Hessian(m.in_features), gptq.Hessian(m.in_features)) for p, m in mods.items()}
    part = [0]
    hooks = [m.register_forward_pre_hook(lambda m, a, p=p: hess[p][part[0]].add(a[0])) for p, m in mods.items()]
    for i in range(0, len(rows), 8):
        part[0] = (i // 8) % 2  # batches of 8 windows alternate between fit and held-out
        model(input_ids=torch.stack(rows[i:i + 8]), use_cache=False)
    for h in hooks:
        h.remove()
    lines = ["# GPTQ damping on calibration data (SmolLM2-135M, float inputs)", "",
             f"`python benchmarks/bench_damping.py`: blocks {args.blocks}, all 7 linears each; fit on 32 x 512 "
             "tokens of the default calibration text, held out: 32 other windows of it. Output error as a "
             "fraction of round to nearest's on the same grid (asym, clip search, act_order), averaged over "
             "the layers.", "",
             "| bits | group | damp_percent | held-out error / RTN | fit error / RTN |", "|---|---|---|---|---|"]
    for grid in args.grids:
        bits, group = int(grid.split(":")[0]), grid.split(":")[1]
        group = None if group == "pc" else int(group)
        rtn = {p: gptq.rtn_quantize(m.weight, bits=bits, group_size=group, sym=False, clip_search=True).dequantize()
               for p, m in mods.items()}
        base = {p: (error(m.weight, rtn[p], hess[p][1].h), error(m.weight, rtn[p], hess[p][0].h))
                for p, m in mods.items()}
        for damp in args.damps:
            ho = fit = 0.0  # mean over layers of the error relative to the layer's RTN error
            for p, m in mods.items():
                inv = gptq.invert(hess[p][0].h, act_order=True, damp_percent=damp, name=p)
                q = gptq.gptq_quantize(m.weight, inv, bits=bits, group_size=group, sym=False,
                                       clip_search=True).dequantize()
                ho += error(m.weight, q, hess[p][1].h) / base[p][0] / len(mods)
                fit += error(m.weight, q, hess[p][0].h) / base[p][1] / len(mods)
            lines.append(f"| {bits} | {group or 'per channel'} | {damp:g} | {ho:.3f} | {fit:.3f} |")
            print(lines[-1], flush=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "damping_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
