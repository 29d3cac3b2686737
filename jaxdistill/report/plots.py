"""The report's pictures (PNG, matplotlib's Agg backend): training curves per loss component,
validation curves with the table's measurement marked, and quality against latency (or params)
with the Pareto front.

Pure drawing: the callers (``report.write``, ``report.quickstart``) read the runs
and pass plain numbers. Every figure has a fixed size in inches and a fixed dpi and is saved
without tight bounding boxes, so its pixel size is known in advance (``*_size`` functions; the
tests check the files against them). A run keeps its colour in every figure (``colors``).
"""

import math
from typing import Sequence

DPI = 100
PANEL_IN = (4.0, 3.0)  # one training-curve panel (width, height) in inches
PANEL_COLUMNS = 3
VALIDATION_IN = (7.0, 4.5)
SCATTER_PANEL_IN = (5.5, 4.5)

# (steps, values): one run's curve; values may hold NaN (a non-finite row).
Curve = tuple[Sequence[int], Sequence[float]]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")  # files only, no display needed
  import matplotlib.pyplot as plt

  return plt


def colors(names: Sequence[str]) -> dict[str, str]:
  """A colour per name, in order (matplotlib's tab10 cycle), so figures agree."""
  palette = [f"C{i % 10}" for i in range(len(names))]
  return dict(zip(names, palette))


def grid(panels: int) -> tuple[int, int]:
  """(rows, columns) of the training-curve figure for ``panels`` panels."""
  cols = max(1, min(PANEL_COLUMNS, panels))
  return max(1, math.ceil(panels / cols)), cols


def training_size(panels: int) -> tuple[int, int]:
  """The training-curve PNG's (width, height) in pixels."""
  rows, cols = grid(panels)
  return round(cols * PANEL_IN[0] * DPI), round(rows * PANEL_IN[1] * DPI)


def validation_size() -> tuple[int, int]:
  return round(VALIDATION_IN[0] * DPI), round(VALIDATION_IN[1] * DPI)


def scatter_size(panels: int) -> tuple[int, int]:
  return round(panels * SCATTER_PANEL_IN[0] * DPI), round(SCATTER_PANEL_IN[1] * DPI)


def _save(fig, plt, path: str) -> None:
  fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": it would change the pixel size
  plt.close(fig)


def training_curves(
  series: dict[str, dict[str, Curve]], path: str, title: str = "", color: dict | None = None
) -> None:
  """One panel per metric (e.g. ``train/loss``, ``task/ce``, ``distill/kl``), a line per run.

  Args:
    series: metric -> run name -> (steps, values); panels in the dict's order.
    path: the PNG to write (``training_size(len(series))`` pixels).
    title: the figure's title.
    color: run name -> colour (``colors``); default: by order of appearance.
  """
  plt = _pyplot()
  rows, cols = grid(len(series))
  fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_IN[0], rows * PANEL_IN[1]))
  axes = list(getattr(axes, "flat", [axes]))
  names = list(dict.fromkeys(n for runs in series.values() for n in runs))
  color = color or colors(names)
  for ax, (metric, runs) in zip(axes, series.items()):
    for name, (steps, values) in runs.items():
      ax.plot(steps, values, color=color[name], label=name, linewidth=1.2)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("training step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[len(series) :]:
    ax.axis("off")
  if axes and series:
    axes[0].legend(fontsize=7)
  if title:
    fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  _save(fig, plt, path)


def validation_curves(
  curves: dict[str, Curve],
  finals: dict[str, tuple[int, float]],
  ylabel: str,
  path: str,
  levels: dict[str, float] | None = None,
  color: dict | None = None,
) -> None:
  """Each run's periodic evaluation as a line, and the table's measurement as a marker.

  Args:
    curves: run name -> (steps, values) of the periodic evaluation (may be empty).
    finals: run name -> (step, value) of the table's measurement (a teacher may have only this).
    ylabel: the quantity (e.g. "validation cross-entropy (nats)").
    path: the PNG to write (``validation_size()`` pixels).
    levels: name -> a measurement without a step (a teacher), drawn as a dashed level.
    color: name -> colour (``colors``); default: by order of appearance.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=VALIDATION_IN)
  levels = levels or {}
  color = color or colors(list(dict.fromkeys([*levels, *curves, *finals])))
  for name, value in levels.items():
    ax.axhline(value, color=color[name], linestyle="--", linewidth=1, label=f"{name} (table)")
  for name, (steps, values) in curves.items():
    if len(steps):
      ax.plot(steps, values, color=color[name], marker=".", label=f"{name} (periodic)")
  for name, (step, value) in finals.items():
    ax.plot([step], [value], color=color[name], marker="D", markersize=8, linestyle="none",
            markeredgecolor="black", label=f"{name} (table)")  # fmt: skip
  ax.set(xlabel="training step", ylabel=ylabel, title="Validation: periodic (lines) and table (◆)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  _save(fig, plt, path)


def quality_scatter(
  panels: list[dict], ylabel: str, higher_is_better: bool, path: str, color: dict | None = None
) -> None:
  """Quality against cost, one panel per cost axis, the Pareto front joined and ringed.

  Args:
    panels: each {"title", "xlabel", "points": [(name, x, y, is_teacher, on_front)]}; points
      with a None coordinate are left out.
    ylabel: the quality (e.g. "validation CE (nats), lower is better").
    higher_is_better: the quality's direction (only for the front's line).
    path: the PNG to write (``scatter_size(len(panels))`` pixels).
    color: name -> colour (``colors``); default: by order of appearance.
  """
  plt = _pyplot()
  from matplotlib import ticker

  fig, axes = plt.subplots(
    1, len(panels), figsize=(len(panels) * SCATTER_PANEL_IN[0], SCATTER_PANEL_IN[1])
  )
  axes = list(getattr(axes, "flat", [axes]))
  names = list(dict.fromkeys(p[0] for panel in panels for p in panel["points"]))
  color = color or colors(names)
  for ax, panel in zip(axes, panels):
    points = [p for p in panel["points"] if p[1] is not None and p[2] is not None]
    for name, x, y, is_teacher, on_front in points:
      ax.scatter([x], [y], color=color[name], marker="*" if is_teacher else "o",
                 s=160 if is_teacher else 60, zorder=3, label=name)  # fmt: skip
      if on_front:
        ax.scatter([x], [y], facecolors="none", edgecolors="red", s=320, linewidths=1.5, zorder=4)
      ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    front = sorted((x, y) for _, x, y, _, on in points if on)
    if len(front) > 1:  # the front as a staircase: quality only improves as cost grows
      ax.step(*zip(*front), where="post", color="red", alpha=0.5, linewidth=1, zorder=2)
    if points and min(p[1] for p in points) > 0:
      ax.set_xscale("log")  # costs span orders of magnitude; plain numbers on the ticks
      ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set(xlabel=panel["xlabel"], ylabel=ylabel, title=panel["title"])
    ax.grid(alpha=0.3, which="both")
  arrow = "↑" if higher_is_better else "↓"
  fig.suptitle(f"Quality ({arrow} better) against cost; red rings: the Pareto front", fontsize=10)
  fig.tight_layout()
  _save(fig, plt, path)
