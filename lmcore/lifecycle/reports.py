"""A training stage's reports, written one way: reports/<stage>.json, the train and val series as CSV, the loss
plot, and the report and plot logged to the stage's run.

Floats are rounded so reruns are byte-identical and free of float-printing noise. The two rules the training
stages have always used live here side by side (`significant` for pretraining, `decimals` for fine-tuning, and
lmcore.scoring's decimals for evaluation): one rule for all would change the bytes of every committed report, which
the project's reproducibility checks compare.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcore.files import atomic_write_text
from lmcore.reporting import reporter

if TYPE_CHECKING:
    from lmcore.lifecycle.paths import Paths

Rounding = Callable[[Any], Any]


def significant(digits: int) -> Rounding:
    """Floats to `digits` significant digits (non-finite ones as text); anything else unchanged."""

    def round_value(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.{digits}g}") if math.isfinite(value) else str(value)
        return value

    return round_value


def decimals(places: int) -> Rounding:
    """Floats to `places` decimals, inside dicts and lists too; anything else unchanged."""

    def round_value(value: Any) -> Any:
        if isinstance(value, float):
            return round(value, places)
        if isinstance(value, dict):
            return {k: round_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [round_value(v) for v in value]
        return value

    return round_value


def series_csv(rows: list[dict[str, Any]], columns: list[str], rounding: Rounding) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([rounding(row.get(c, "")) for c in columns] for row in rows)
    return out.getvalue()


def write_training_reports(
    paths: Paths,
    stage: str,
    report: dict[str, Any],
    history: dict[str, list[dict]],
    val_columns: list[str],
    rounding: Rounding,
) -> None:
    """reports/<stage>.json (`report`, already rounded), the series, the loss plot; report and plot logged."""
    from lmcore.plots import plot_training_curves

    atomic_write_text(paths.report(stage), json.dumps(report, indent=2, sort_keys=True) + "\n")
    plots = paths.plots(stage)
    atomic_write_text(plots / "train.csv", series_csv(history["train"], ["step", "loss", "lr", "grad_norm"], rounding))
    atomic_write_text(plots / "val.csv", series_csv(history["val"], val_columns, rounding))
    png = plot_training_curves(history["train"], history["val"], plots / "loss.png", title=stage)
    rep = reporter()
    rep.log_artifact(paths.report(stage))
    rep.log_artifact(png, "plots")
