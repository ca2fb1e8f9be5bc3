"""Figures of the demo's reports (matplotlib, the ``demo`` extra): sample grids per run,
a metric against training steps, a metric per setting over seeds (mean ± std bars), and
metrics against the number of network evaluations (mean ± std lines).

Summaries are ``sfd_jax.sweep.mean_std``'s: ``{group: {metric: {"values", "mean",
"std"}}}``. Every function writes one PNG and returns its path.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from sfd_jax.core import optional

matplotlib = optional.require("matplotlib", extra="demo", purpose="--mode=demo")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

METRIC_LABELS = {"fid": "demo FID (lower is better)", "class_accuracy": "class accuracy"}


def _save(fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def sample_grids(grids: Sequence[np.ndarray], titles: Sequence[str], path: str) -> str:
  """Side-by-side uint8 grids (one row per class), one titled panel each."""
  fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 4.6))
  for ax, grid, title in zip(np.atleast_1d(axes), grids, titles):
    ax.imshow(grid, interpolation="nearest")
    ax.set(xticks=[], yticks=[], ylabel="one row per class (0–9)")
    ax.set_title(title, fontsize=10)
  return _save(fig, path)


def curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str, *, xlabel: str,
           ylabel: str, floor: float | None = None, floor_label: str = "") -> str:
  """One line per label through its (x, y) points (log y), an optional floor line."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for label, points in series.items():
    if points:
      ax.plot(*zip(*points), marker="o", label=label)
  if floor is not None:
    ax.axhline(floor, color="grey", ls="--", lw=1, label=floor_label)
  ax.set(xlabel=xlabel, yscale="log", ylabel=ylabel)
  ax.legend()
  ax.grid(alpha=0.3)
  return _save(fig, path)


def bars_over_seeds(summary, names: Sequence[str], metrics: Sequence[str], path: str, *,
                    floor: float | None = None) -> str:
  """Per metric, one bar per setting at its mean with a ± std whisker and the seeds' dots."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6))
  for ax, metric in zip(np.atleast_1d(axes), metrics):
    ax.bar(names, [summary[n][metric]["mean"] for n in names], capsize=4, color="#6a8fc7",
           yerr=[summary[n][metric]["std"] for n in names])
    for i, n in enumerate(names):
      vals = summary[n][metric]["values"]
      ax.plot([i] * len(vals), vals, "k.", ms=4)
      seeds = len(vals)
    ax.set_title(f"{METRIC_LABELS.get(metric, metric)}, mean ± std over {seeds} seeds",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    if floor is not None and metric == "fid":
      ax.axhline(floor, color="grey", ls="--", lw=1)
  return _save(fig, path)


def lines_over_nfe(summary, settings: Mapping[str, tuple[str, Sequence[int]]],
                   metrics: Sequence[str], path: str, *, floor: float | None = None) -> str:
  """Per metric, one line per setting (label, NFEs) through ``summary[f"{setting}@{nfe}"]``
  (mean ± std over seeds), NFE on a log axis; FID on a log axis with the real-data floor."""
  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8))
  ticks = sorted({int(k) for _, ks in settings.values() for k in ks})
  for ax, metric in zip(np.atleast_1d(axes), metrics):
    for name, (label, ks) in settings.items():
      rows = [summary[f"{name}@{k}"][metric] for k in ks]
      ax.errorbar(list(ks), [r["mean"] for r in rows], yerr=[r["std"] for r in rows],
                  capsize=3, marker="o", label=label)
    seeds = len(rows[0]["values"])
    ax.set(xscale="log", xlabel="network evaluations per image (NFE)", xticks=ticks,
           xticklabels=[str(t) for t in ticks], yscale="log" if metric == "fid" else "linear",
           ylabel=f"{METRIC_LABELS.get(metric, metric)}, {seeds} seeds")
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    if floor is not None and metric == "fid":
      ax.axhline(floor, color="grey", ls="--", lw=1, label="held-out real images")
      ax.legend(fontsize=8)
  return _save(fig, path)
