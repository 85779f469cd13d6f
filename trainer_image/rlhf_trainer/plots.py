"""PNG plots a person would rather look at than read: training curves and score distributions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def read_log(path: Path | None) -> list[dict]:
    """A training log's entries; when an attempt resumed from an earlier step, its entries replace the ones the
    interrupted attempt logged from that step on (one curve, not several drawn over each other)."""
    if path is None or not path.exists():
        return []
    entries: list[dict] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entries and "step" in entry and entry["step"] < entries[-1].get("step", 0):
            entries = [e for e in entries if e.get("step", 0) < entry["step"]]
        entries.append(entry)
    return entries


def curve(entries: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(e["step"], e[key]) for e in entries if key in e and e[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def evaluation_figure(
    out: Path,
    judge_scores: dict[str, Sequence[float]],
    logs: dict[str, list[dict]],
) -> None:
    """Judge-score histograms per model, plus every training curve that was logged.

    Args:
        out: PNG path.
        judge_scores: model label -> gold-judge score per held-out prompt.
        logs: stage -> its log entries (trainer_log.jsonl / ppo metrics.jsonl), each with a "step".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("sft", "loss", "SFT loss"), ("reward", "loss", "reward-model loss"),
              ("reward", "accuracy", "reward-model train accuracy"),
              ("ppo", "objective/rm_score", "PPO reward (RM score)"), ("ppo", "objective/kl", "PPO KL to reference")]
    panels = [p for p in panels if curve(logs.get(p[0], []), p[1])[0]]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.2 * (1 + len(panels)), 3.4), squeeze=False)
    ax = axes[0][0]
    for label, scores in judge_scores.items():
        mean = sum(scores) / max(len(scores), 1)
        ax.hist(list(scores), bins=20, range=(-1, 1), alpha=0.55, label=f"{label} (mean {mean:+.2f})")
    ax.set_title("gold judge on held-out prompts")
    ax.set_xlabel("judge score")
    ax.legend(fontsize=8)
    for ax, (stage, key, title) in zip(axes[0][1:], panels):
        xs, ys = curve(logs[stage], key)
        ax.plot(xs, ys, marker=".", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
