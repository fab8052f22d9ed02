"""Result tables (markdown / terminal) and the accuracy plot of `mquant demo`."""

from __future__ import annotations

import io
import os
import platform
from datetime import datetime, timezone


def machine_description() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def results_table(rows: list[dict], tasks: list[str]) -> str:
    """A markdown table: one row per recipe, one column per task, average, size, the size of the
    compressed-tensors export (where rows were exported) and prefill time."""
    exported = any(r.get("export") for r in rows)
    head = ["recipe", "bits V/P/L", *tasks, "average", "Δ vs FP", "size MB",
            *(["compressed-tensors MB"] if exported else []), "prefill ms"]
    fp = next((r["average"] for r in rows if r["recipe"] == "fp32"), None)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        delta = "" if fp is None or r["recipe"] == "fp32" else f"{100 * (r['average'] - fp):+.1f}"
        export = f"{r['export']['size_mb']:.2f} ({r['export']['scheme']})" if r.get("export") else "—"
        cells = [r["recipe"], r["bits"], *(f"{100 * r['tasks'][t]:.1f}" for t in tasks),
                 f"**{100 * r['average']:.1f}**", delta, f"{r['size_mb']:.2f}", *([export] if exported else []),
                 f"{r['prefill_ms']:.1f}" if r.get("prefill_ms") is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(rows: list[dict], tasks: list[str], fp_average: float, path) -> None:
    """Average accuracy per recipe against the FP line, and the per-task scores beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quant = [r for r in rows if r["recipe"] != "fp32"]
    names = [r["recipe"] for r in quant]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 0.45 * len(quant) + 2.2), sharey=True)
    y = range(len(quant))
    ax1.barh(list(y), [100 * r["average"] for r in quant], color="#4c72b0")
    ax1.axvline(100 * fp_average, color="black", linestyle="--", label=f"FP32 {100 * fp_average:.1f}")
    for i, r in enumerate(quant):
        ax1.text(100 * r["average"] + 0.5, i, f"{100 * r['average']:.1f}", va="center", fontsize=8)
    ax1.set_yticks(list(y), names)
    ax1.invert_yaxis()
    ax1.set_xlim(0, 105)
    ax1.set_xlabel("average score (%)")
    ax1.legend(loc="lower right", fontsize=8)
    ax1.set_title("Average over the benchmark")
    fp_row = next(r for r in rows if r["recipe"] == "fp32")
    for k, t in enumerate(tasks):
        ax2.scatter([100 * (r["tasks"][t] - fp_row["tasks"][t]) for r in quant], list(y), label=t, s=18,
                    marker="os^vDP*"[k % 7])
    ax2.axvline(0, color="black", linestyle="--")
    ax2.set_xlabel("score − FP score (points)")
    ax2.set_title("Per task, relative to FP")
    ax2.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    from mquant.fileio import write_bytes_atomic

    write_bytes_atomic(path, buf.getvalue())
