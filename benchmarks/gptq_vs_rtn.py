"""GPTQ against RTN on the real-weights model's decoder layers, on held-out inputs, with and without rotation.

    python benchmarks/gptq_vs_rtn.py [--layers 2,12] [--n 8] [--out docs/real-model/gptq_vs_rtn.json]

SmolLM2's residual stream carries massive activations (one token, one channel, thousands of times
the median) from layer 3 on. A layer input with such a row makes GPTQ's Hessian H = 2/N sum x^T x
nearly rank one, and its damping (1 % of mean diag H) then swamps every other direction, so the
error feedback can do worse than rounding on ordinary tokens. This measures, per linear, the
held-out relative output error ||X (W - Q(W))^T||^2 / ||X W^T||^2 of 4-bit per-channel RTN (MSE clip)
and GPTQ (act-order, 1 % damping) — over every held-out row and over the rows without a massive
activation — in three settings: as pretrained; GPTQ with the massive rows kept out of the Hessian;
and after the rotations (LN2RN, Hadamard R1/R2, online R4 before `down_proj`), which spread the
massive channel.

Hessian rows come from the calib split's first `--n` prompts, held-out rows from the next `--n`
(both calib split; the test split is never read).
"""

from __future__ import annotations

import argparse

import torch

from mquant.algorithms.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from mquant.algorithms.rtn import rtn_quantize
from mquant.fileio import write_json_atomic
from mquant.models.vlm import load_pretrained
from mquant.recipe import PRESETS, TransformScheme
from mquant.runtime.patches import observe_inputs, weight_2d
from mquant.transforms.apply import apply_transforms
from mquant.zoo import benchmark
from mquant.zoo.real.build import REAL_TASKS, real_model

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
MASSIVE = 100.0  # a row is massive when its max |x| exceeds this many times the median row's


def capture(vlm, names: list[str], samples) -> dict[str, torch.Tensor]:
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    callbacks = {vlm.model.get_submodule(n): (lambda x, n=n: rows[n].append(x.float().cpu())) for n in names}
    observe_inputs(vlm.model, callbacks, [vlm.encode([s], with_answer=True) for s in samples])
    return {n: torch.cat(r) for n, r in rows.items()}


def relative_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float(((x @ (w - w_hat).T) ** 2).sum() / ((x @ w.T) ** 2).sum().clamp(min=1e-30))


def massive_rows(x: torch.Tensor) -> torch.Tensor:
    peak = x.abs().amax(dim=1)
    return peak > MASSIVE * peak.median()


def study(vlm, names, calib, held, rotated: bool) -> list[dict]:
    args = PRESETS["mquant-w4a8"].language.weights.grid()
    cfg = GPTQConfig()
    fit, test = capture(vlm, names, calib), capture(vlm, names, held)
    out = []
    for name in names:
        w = weight_2d(vlm.model.get_submodule(name)).float()
        x_fit, x_test = fit[name], test[name]
        ordinary = ~massive_rows(x_test)
        H, H_plain = HessianAccumulator(w.shape[1]), HessianAccumulator(w.shape[1])
        H.add(x_fit)
        H_plain.add(x_fit[~massive_rows(x_fit)])
        results = {"rtn": rtn_quantize(w, args), "gptq": gptq_quantize(w, H.H, args, cfg).weight}
        if not rotated:
            results["gptq, massive rows out of H"] = gptq_quantize(w, H_plain.H, args, cfg).weight
        row = {"linear": name, "rotated": rotated, "massive_rows_fit": int(massive_rows(x_fit).sum()),
               "max_over_median_row": round(float(x_fit.abs().amax(1).max() / x_fit.abs().amax(1).median()), 1)}
        for label, q in results.items():
            w_hat = q.dequantize()
            row[label] = {"all": relative_error(x_test, w, w_hat), "ordinary": relative_error(x_test[ordinary], w, w_hat)}
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="2,12")
    p.add_argument("--n", type=int, default=8, help="prompts for the Hessian, and as many held out (default 8)")
    p.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args()
    prompts = benchmark.mixed("calib", 2 * args.n, tasks=REAL_TASKS)
    calib, held = prompts[: args.n], prompts[args.n :]
    names = [f"model.language_model.layers.{k}.{lin}" for k in map(int, args.layers.split(",")) for lin in LINEARS]
    vlm = load_pretrained(real_model())
    rows = study(vlm, names, calib, held, rotated=False)
    apply_transforms(vlm, TransformScheme(ln2rn=True, rotate=True, online_hadamard=True))
    rows += study(vlm, names, calib, held, rotated=True)
    print("| linear | rotated | max/median row | RTN all | GPTQ all | GPTQ, massive out of H, all "
          "| RTN ordinary | GPTQ ordinary | GPTQ, massive out of H, ordinary |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cut = r.get("gptq, massive rows out of H")
        cells = [r["linear"].split("layers.")[1], "yes" if r["rotated"] else "no", str(r["max_over_median_row"])]
        for subset in ("all", "ordinary"):
            cells += [f"{r['rtn'][subset]:.4f}", f"{r['gptq'][subset]:.4f}", f"{cut[subset]:.4f}" if cut else "—"]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        write_json_atomic(args.out, {"layers": args.layers, "n": args.n, "rows": rows})


if __name__ == "__main__":
    main()
