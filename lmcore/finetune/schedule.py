"""How long a fine-tune runs and how its classes weigh: both derived from the training split, deterministically.

`resolve_steps` turns `steps: auto` (one epoch, capped) or `epochs: E` into a whole number of optimizer steps
before anything trains, so the loop, its schedule, the checkpoint fingerprint and every record see one number.
`balanced_class_weights` is scikit-learn's `class_weight="balanced"` (n_samples / (n_classes × count_c)), written
out here: one line of arithmetic does not warrant a dependency.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Steps:
    """The resolved number of optimizer steps and how it was reached."""

    steps: int
    rule: Literal["params", "auto", "epochs"]
    rows: int
    rows_per_step: int
    cap: int | None = None  # `auto` only
    capped: bool = False
    epochs: float | None = None  # `epochs` only

    def line(self) -> str:
        """One line saying how the number was chosen; empty for an explicit number."""
        if self.rule == "auto":
            cap = f"capped at {self.cap}" if self.capped else f"under the cap of {self.cap}"
            return (
                f"steps auto = {self.steps} (one epoch of {self.rows} rows at {self.rows_per_step} per step, "
                f"{cap}: finetune.max_auto_steps)"
            )
        if self.rule == "epochs":
            return f"steps = {self.steps} ({self.epochs:g} epochs of {self.rows} rows at {self.rows_per_step} per step)"
        return ""

    def record(self) -> dict[str, object]:
        """What a report keeps of the rule (nothing for an explicit number, so such reports do not change)."""
        if self.rule == "params":
            return {}
        out: dict[str, object] = {"rule": self.rule, "rows": self.rows, "rows_per_step": self.rows_per_step}
        if self.rule == "auto":
            out |= {"cap": self.cap, "capped": self.capped}
        else:
            out["epochs"] = self.epochs
        return {"steps_resolved": out}


def resolve_steps(
    steps: int | Literal["auto"], epochs: float | None, rows: int, rows_per_step: int, max_auto_steps: int
) -> Steps:
    """Optimizer steps for `rows` training rows (packed sequences for packed SFT) at `rows_per_step` rows a step
    (batch size × gradient accumulation): an explicit number as is, `epochs` → ceil(epochs × rows / rows_per_step),
    `auto` → one epoch, at most `max_auto_steps`; never under 1."""
    if rows_per_step < 1:
        raise ValueError(f"rows_per_step must be ≥ 1, got {rows_per_step}")
    if epochs is not None:
        if steps != "auto":
            raise ValueError("epochs and an explicit steps are mutually exclusive")
        n = max(1, math.ceil(epochs * rows / rows_per_step))
        return Steps(n, "epochs", rows, rows_per_step, epochs=epochs)
    if steps == "auto":
        epoch = max(1, math.ceil(rows / rows_per_step))
        n = min(epoch, max_auto_steps)
        return Steps(n, "auto", rows, rows_per_step, cap=max_auto_steps, capped=epoch > max_auto_steps)
    return Steps(int(steps), "params", rows, rows_per_step)


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """n_samples / (n_classes × count_c) per class id, as scikit-learn's compute_class_weight("balanced");
    a class with no row gets weight 0 (it cannot appear as a target)."""
    counts = Counter(labels)
    total = len(labels)
    return [total / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)]
