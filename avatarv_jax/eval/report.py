"""The evaluation report: JSON with every metric and its bootstrap confidence interval, PNG
plots (metrics over time, lip sync per language, per-clip distributions) and a Markdown table.

``write_report`` builds everything in ``OUT.partial-PID`` and renames it to ``OUT`` at the end,
so a failed run leaves no half-written report.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np

# metric -> True when higher is better (the summary table marks the direction)
HEADLINE = {"lse_c": True, "lse_d": False, "lip_sync_corr": True,
            "silence_closed_fraction": True, "face_similarity": True,
            "attribute_agreement": True, "embedding_similarity": True, "style_match": True,
            "motion_std": True}


def bootstrap_ci(values, resamples: int = 2000, level: float = 0.95, seed: int = 0
                 ) -> dict[str, float]:
    """Mean and percentile-bootstrap interval of the mean; NaNs are left out."""
    x = np.asarray(values, np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, (resamples, x.size))].mean(1)
    a = (1 - level) / 2
    return {"mean": float(x.mean()), "ci_low": float(np.quantile(means, a)),
            "ci_high": float(np.quantile(means, 1 - a)), "n": int(x.size)}


def summarize(per_clip: dict[str, list[dict[str, float]]], seed: int = 0
              ) -> dict[str, dict[str, dict[str, float]]]:
    """{system: {metric: {mean, ci_low, ci_high, n}}} over the clips of each system."""
    out = {}
    for system, rows in per_clip.items():
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float))})
        out[system] = {k: bootstrap_ci([r.get(k, math.nan) for r in rows], seed=seed)
                       for k in keys}
    return out


def _fmt(s: dict[str, float]) -> str:
    if s["n"] == 0:
        return "–"
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def markdown_table(summary: dict, metrics=None) -> str:
    metrics = [m for m in (metrics or HEADLINE)
               if any(m in s for s in summary.values())]
    head = "| system | " + " | ".join(
        f"{m} {'↑' if HEADLINE.get(m, True) else '↓'}" for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for system, s in summary.items():
        lines.append(f"| {system} | " + " | ".join(
            _fmt(s[m]) if m in s else "–" for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _plots(out: str, per_clip: dict, series: dict, languages: dict | None, window_s: float):
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the report's plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k for s in series.values() for clip in s for k in clip})
    if names:
        fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
        for ax, name in zip(axes[0], names):
            for system, clips in series.items():
                ys = [c[name] for c in clips if name in c]
                if not ys:
                    continue
                n = max(len(y) for y in ys)
                arr = np.full((len(ys), n), np.nan)
                for i, y in enumerate(ys):
                    arr[i, :len(y)] = y
                with np.errstate(all="ignore"):
                    mean = np.nanmean(arr, 0)
                ax.plot((np.arange(n) + 0.5) * window_s, mean, marker="o", label=system)
            ax.set_xlabel("time (s)")
            ax.set_title(name)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "metrics_over_time.png"), dpi=100)
        plt.close(fig)

    if languages:
        langs = sorted({l for v in languages.values() for l in v})
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, metric in zip(axes, ("lse_c", "lip_sync_corr")):
            width = 0.8 / max(len(per_clip), 1)
            for j, (system, rows) in enumerate(per_clip.items()):
                vals = []
                for lang in langs:
                    xs = [r.get(metric, np.nan) for r, l in zip(rows, languages[system])
                          if l == lang]
                    vals.append(np.nanmean(xs) if xs else np.nan)
                ax.bar(np.arange(len(langs)) + j * width, vals, width, label=system)
            ax.set_xticks(np.arange(len(langs)) + 0.4 - width / 2, langs)
            ax.set_title(f"{metric} per language")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "lip_sync_per_language.png"), dpi=100)
        plt.close(fig)

    metrics = [m for m in HEADLINE if any(m in r for rows in per_clip.values() for r in rows)]
    if metrics:
        cols = min(3, len(metrics))
        rows_n = -(-len(metrics) // cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3 * rows_n), squeeze=False)
        for ax, m in zip(axes.ravel(), metrics):
            data = [[r[m] for r in rows if m in r and np.isfinite(r[m])]
                    for rows in per_clip.values()]
            ax.boxplot([d if d else [np.nan] for d in data])
            ax.set_xticks(np.arange(1, len(per_clip) + 1), list(per_clip), rotation=20,
                          fontsize=7)
            ax.set_title(m)
        for ax in axes.ravel()[len(metrics):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "per_clip_distributions.png"), dpi=100)
        plt.close(fig)


def write_report(out_dir: str, per_clip: dict[str, list[dict[str, float]]],
                 series: dict[str, list[dict[str, list[float]]]] | None = None,
                 languages: dict[str, list[str]] | None = None, meta: dict[str, Any] | None = None,
                 window_s: float = 5.0) -> dict:
    """report.json, summary.md and the PNG plots in ``out_dir`` (which must not exist)."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; choose a new report directory")
    summary = summarize(per_clip)
    tmp = f"{out_dir.rstrip(os.sep)}.partial-{os.getpid()}"
    os.makedirs(tmp)
    try:
        report = {"meta": meta or {}, "summary": summary, "per_clip": per_clip,
                  "series": series or {}, "languages": languages or {}, "window_s": window_s}
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1, allow_nan=True)
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write("# Evaluation summary\n\nMean over clips [95 % bootstrap interval].\n\n")
            f.write(markdown_table(summary))
        _plots(tmp, per_clip, series or {}, languages, window_s)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report
