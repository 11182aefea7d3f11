"""SQNR per layer in graph order: where the error enters (own, solo) and how it builds up (accumulated).

matplotlib is an optional extra; without it `plot_sensitivity` raises MissingExtraError.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fxq.errors import MissingExtraError

if TYPE_CHECKING:
    from fxq.analysis.sensitivity import SensitivityReport


def _values(report: "SensitivityReport", attribute: str) -> list[float]:
    """Per-layer values for a line plot: unmeasured layers are gaps, an error-free layer sits at the top."""
    values = [getattr(layer, attribute) for layer in report.layers]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    ceiling = max(finite) + 10.0 if finite else 100.0
    return [math.nan if v is None else (ceiling if math.isinf(v) else v) for v in values]


def plot_sensitivity(report: "SensitivityReport", path: str | Path | None = None) -> Any:
    """A matplotlib figure of accumulated, own and solo SQNR per layer; saved to `path` when given."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("matplotlib", "the sensitivity plot") from exc
    names = [layer.name for layer in report.layers]
    positions = list(range(len(names)))
    figure, axes = plt.subplots(figsize=(max(8.0, 0.22 * len(names) + 3), 5.0))
    axes.plot(positions, _values(report, "sqnr_db"), marker=".", label="accumulated (int8 model vs float)")
    axes.plot(positions, _values(report, "own_sqnr_db"), marker=".", label="own (layer alone, float input)")
    axes.plot(positions, _values(report, "solo_sqnr_db"), marker=".",
              label="solo (model output, only this layer int8)")
    axes.axhline(report.end_to_end_sqnr_db, color="grey", linestyle="--", linewidth=1,
                 label=f"end to end ({report.end_to_end_sqnr_db:.1f} dB)")
    axes.set_xticks(positions)
    axes.set_xticklabels(names, rotation=90, fontsize=7)
    axes.set_ylabel("SQNR (dB)")
    axes.set_title(f"int8 sensitivity per layer ({report.engine})")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
