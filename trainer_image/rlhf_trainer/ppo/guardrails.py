"""Guardrail flags: signs that a PPO run is drifting, reported in every step's metrics for the operator.

Each check reads the step's metrics (and the history it keeps) and sets ``guardrail/<name>`` to 1.0 or 0.0:

* ``kl_above_threshold``: the mean per-token KL to the reference exceeds ``maxKl``.
* ``reward_hacking_suspected``: over the last ``hackingWindow`` steps the reward-model score rose while the
  gold judge's fell, each significantly (:func:`_significant_change`); needs a judge.
* ``length_collapse``: the mean response length fell below ``minLengthRatio`` of the first step's.
* ``no_progress``: the best mean reward-model score has not improved for ``noProgressSeconds``.

None of them stops training; :attr:`Guardrails.fired` remembers every flag that was ever raised.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from statistics import fmean, variance

from rlhf_api import metric_keys
from rlhf_api.spec import PPOGuardrails

SIGNIFICANCE = 2.0  # standard errors a change must exceed to count


def _significant_change(window: list[float]) -> int:
    """+1 if the window's values rose, -1 if they fell, 0 if the change is within their noise.

    The mean of the window's second half against that of its first half, counted only when the difference
    exceeds :data:`SIGNIFICANCE` standard errors, estimated from how much the per-step means scatter inside each
    half (Welch's). Detail: a step's mean score over one batch of rollouts is noisy; comparing the halves' means
    alone flagged healthy demo runs on gold-judge "falls" far inside that noise (figures: docs/measurements.md,
    "Reward-hacking guardrail").
    """
    half = len(window) // 2
    first, second = window[:half], window[-half:]
    change = fmean(second) - fmean(first)
    noise = math.sqrt((variance(first) + variance(second)) / half)
    if abs(change) <= SIGNIFICANCE * noise:
        return 0
    return 1 if change > 0 else -1


class Guardrails:
    def __init__(self, spec: PPOGuardrails, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.rm_history: deque[float] = deque(maxlen=spec.hacking_window)
        self.gold_history: deque[float] = deque(maxlen=spec.hacking_window)
        self.first_length: float | None = None
        self.best_score = float("-inf")
        self.best_since = clock()
        self.fired: set[str] = set()

    def check(self, metrics: dict[str, float]) -> dict[str, float]:
        """The flags for this step, as ``guardrail/<name>`` -> 1.0 or 0.0."""
        flags = dict.fromkeys(metric_keys.GUARDRAILS, False)
        spec = self.spec
        if spec.max_kl is not None:
            flags["kl_above_threshold"] = metrics["objective/kl"] > spec.max_kl

        self.rm_history.append(metrics["objective/rm_score"])
        if "objective/gold_score" in metrics:
            self.gold_history.append(metrics["objective/gold_score"])
            if len(self.gold_history) == spec.hacking_window:
                flags["reward_hacking_suspected"] = (_significant_change(list(self.rm_history)) > 0
                                                     and _significant_change(list(self.gold_history)) < 0)

        if self.first_length is None:
            self.first_length = metrics["response/length"]
        if spec.min_length_ratio is not None:
            flags["length_collapse"] = metrics["response/length"] < spec.min_length_ratio * self.first_length

        now = self.clock()
        if metrics["objective/rm_score"] > self.best_score:
            self.best_score, self.best_since = metrics["objective/rm_score"], now
        if spec.no_progress_seconds is not None:
            flags["no_progress"] = now - self.best_since > spec.no_progress_seconds

        self.fired.update(name for name, raised in flags.items() if raised)
        return {metric_keys.guardrail(name): float(raised) for name, raised in flags.items()}

    def state_dict(self) -> dict:
        return {"rm_history": list(self.rm_history), "gold_history": list(self.gold_history),
                "first_length": self.first_length, "best_score": self.best_score, "fired": sorted(self.fired)}

    def load_state_dict(self, state: dict) -> None:
        self.rm_history.extend(state["rm_history"])
        self.gold_history.extend(state["gold_history"])
        self.first_length = state["first_length"]
        self.best_score = state["best_score"]
        self.best_since = self.clock()  # wall-clock time does not survive a restart; count from now
        self.fired = set(state["fired"])
