"""The rule of ``unlearn.stop_at``: which forget measure, which direction, which level.

Kept apart from :mod:`simu_core.stopping` (the checks) so that the config can validate a rule
without importing the evaluation suite.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from simu_core.benchmarks.info import BENCHMARK_INFO

#: Each measure with the direction unlearning moves it (the only comparison that makes sense): every
#: benchmark's forget measures (the registry's ``stop_measures``; which benchmark offers which is
#: checked with the benchmark, in :func:`simu_core.config.check_pipeline_models`).
STOP_MEASURES = {measure: direction for info in BENCHMARK_INFO.values() for measure, direction in info.stop_measures.items()}
REFERENCE = "reference"
_RULE_RE = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|<|>|==|=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class StopRule:
    """A parsed ``unlearn.stop_at``: the measure, its comparison and the level (None: the reference's)."""

    measure: str
    comparison: str
    level: float | None

    @property
    def uses_reference(self) -> bool:
        """Whether the run needs the retain reference's evaluation (its level, or its truth ratios)."""
        return self.level is None or self.measure == "forget_quality"

    def reached(self, value: float, level: float) -> bool:
        """Whether ``value`` is at or past ``level`` in the measure's direction."""
        if not math.isfinite(value):
            return False
        return value <= level if self.comparison == "<=" else value >= level

    def within(self, value: float, level: float, tolerance: float) -> bool:
        """Whether ``value`` is no more than ``tolerance`` (relative) away from ``level``."""
        return abs(value - level) <= tolerance * abs(level)

    def text(self) -> str:
        """The rule as written in a config."""
        return f"{self.measure}{self.comparison}{REFERENCE if self.level is None else repr(self.level)}"


def parse_stop_at(text: str) -> StopRule:
    """Parse ``<measure><comparison><level>``; a ValueError names what is wrong and what is allowed."""
    allowed = ", ".join(f"{measure}{op}<level>" for measure, op in STOP_MEASURES.items())
    match = _RULE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not '<measure><comparison><level>' (allowed: {allowed}; e.g. "
                         "forget_prob<=reference, forget_quality>=0.05)")
    measure, comparison, raw = match.groups()
    if measure not in STOP_MEASURES:
        raise ValueError(f"unknown forget measure {measure!r} in {text!r}; known: {sorted(STOP_MEASURES)}")
    if comparison != STOP_MEASURES[measure]:
        direction = "lowers" if STOP_MEASURES[measure] == "<=" else "raises"
        raise ValueError(f"comparison {comparison!r} in {text!r}: unlearning {direction} {measure}, so its level "
                         f"is reached with {STOP_MEASURES[measure]!r} ({measure}{STOP_MEASURES[measure]}{raw})")
    if raw == REFERENCE:
        if measure == "forget_quality":
            raise ValueError(f"{text!r}: the retain reference's own forget quality is 1 by definition (a KS test of "
                             "its truth ratios against themselves); give a p-value, e.g. forget_quality>=0.05")
        return StopRule(measure, comparison, None)
    try:
        level = float(raw)
    except ValueError:
        raise ValueError(f"level {raw!r} in {text!r} is neither a number nor 'reference'") from None
    upper = 1.0
    if not (0.0 < level <= upper) or not math.isfinite(level):
        raise ValueError(f"level {raw!r} in {text!r}: {measure} is a probability, score or accuracy; the level must "
                         "be in (0, 1]")
    return StopRule(measure, comparison, level)
