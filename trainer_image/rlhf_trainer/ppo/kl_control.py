"""KL controllers: the coefficient beta of the per-token KL penalty, fixed or adapted toward a target.

Both have the same three members: ``value`` (the current beta), ``update(current_kl, n_episodes)`` after
each PPO step, and ``state_dict()`` / ``load_state_dict()`` for checkpoints.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class FixedKLController:
    """beta stays at its initial value."""

    value: float

    def update(self, current_kl: float, n_episodes: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    """The proportional controller of Ziegler et al. 2019 (arXiv 1909.08593, section 2.2).

    After a step whose rollouts had a mean KL of ``KL_t`` nats per response::

        e_t       = clip(KL_t / target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + e_t * n_episodes / horizon)

    so beta grows while the policy drifts further than ``target`` from the reference and shrinks while it
    stays closer; ``horizon`` (in episodes) sets how fast.
    """

    value: float
    target: float
    horizon: int

    def update(self, current_kl: float, n_episodes: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_episodes / self.horizon

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(kl_coef: float, target_kl: float | None, horizon: int) -> KLController:
    """Adaptive when a target is given, fixed otherwise."""
    if target_kl is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target_kl, horizon)
