"""The promotion gate's decision, on its boundaries: a tie, a gain at, below and above `register.min_improvement`,
both directions, no champion yet, and a champion that could not be scored on the challenger's data.

Pure and fast (no MLflow, no model): these are the tests `make mutate` runs against the decision function."""

from __future__ import annotations

import pytest

from lmcore.registry import better, gate_decision

HOW = "same eval data"


def decide(value: float, champion: float | None, direction: str = "minimize", min_improvement: float = 0.0):
    return gate_decision("m.x", value, direction, min_improvement, "3", champion, HOW)


@pytest.mark.parametrize(
    ("value", "champion", "direction", "min_improvement", "expected"),
    [
        # minimize (losses, bits per byte): lower wins, by strictly more than min_improvement
        (2.4, 2.5, "minimize", 0.0, True),
        (2.5, 2.5, "minimize", 0.0, False),  # a tie keeps the champion
        (2.6, 2.5, "minimize", 0.0, False),
        (2.45, 2.5, "minimize", 0.1, False),  # a gain below the minimum
        (2.375, 2.5, "minimize", 0.125, False),  # a gain of exactly the minimum (exact in binary)
        (2.25, 2.5, "minimize", 0.125, True),
        # maximize (classification macro-F1): higher wins
        (0.7, 0.6, "maximize", 0.0, True),
        (0.6, 0.6, "maximize", 0.0, False),
        (0.5, 0.6, "maximize", 0.0, False),
        (0.65, 0.6, "maximize", 0.1, False),
        (0.625, 0.5, "maximize", 0.125, False),
        (0.75, 0.5, "maximize", 0.125, True),
    ],
)
def test_better_is_a_strict_improvement_by_more_than_the_minimum(value, champion, direction, min_improvement, expected):
    assert better(value, champion, direction, min_improvement) is expected
    assert decide(value, champion, direction, min_improvement)[0] == ("promoted" if expected else "rejected")


def test_a_challenger_is_first_when_there_is_no_champion():
    assert gate_decision("m.x", 9.0, "minimize", 0.0, None, None, "") == (
        "first",
        "no champion yet: the first version becomes champion",
    )


def test_a_champion_that_cannot_be_scored_rejects_the_challenger_saying_why():
    why = "champion v3 has no m.x on this eval data and it cannot be re-scored"
    assert gate_decision("m.x", 0.0, "minimize", 0.0, "3", None, why) == ("rejected", why)
    assert gate_decision("m.x", 1e9, "maximize", 0.0, "3", None, why) == ("rejected", why)


def test_the_reasons_name_both_values_the_minimum_and_how_the_champion_was_scored():
    assert decide(2.4, 2.5) == ("promoted", "m.x 2.4 beats champion v3 2.5 (same eval data)")
    assert decide(2.45, 2.5, min_improvement=0.1) == (
        "rejected",
        "m.x 2.45 does not beat champion v3 2.5 by more than 0.1 (minimize; same eval data)",
    )
    assert decide(0.5, 0.6, "maximize") == (
        "rejected",
        "m.x 0.5 does not beat champion v3 0.6 by more than 0 (maximize; same eval data)",
    )
