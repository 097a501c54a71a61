"""The benchmarks' shared plot: one line per series over a few sizes, both axes logarithmic."""

from __future__ import annotations

import itertools
from pathlib import Path


def save_log_log_lines(path: Path, sizes: list[int], series: dict[str, list[float]], *, xlabel: str, ylabel: str,
                       title: str, context: str, reference: tuple[float, str] | None = None) -> None:
    """A PNG at `path`: each series (name -> one value per size) as a marked line, `reference` (value,
    label) as a dashed level, the sizes as the x ticks and `context` (the CPU, the settings) above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, values), marker in zip(series.items(), itertools.cycle("o^<sv>Dp*")):
        ax.plot(sizes, values, f"{marker}-", label=name)
    if reference is not None:
        ax.axhline(reference[0], color="grey", lw=0.8, ls="--", label=reference[1])
    ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.legend(fontsize=8)
    fig.suptitle(context, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
