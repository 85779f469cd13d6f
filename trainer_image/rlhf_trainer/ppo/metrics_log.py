"""Per-step metrics: one JSON line per step in ``metrics.jsonl`` (what the evaluate stage plots), TensorBoard
event files when the ``tensorboard`` package is installed, and one short line on stdout.

Names are namespaced as in CleanRL and TRL: ``objective/`` (what PPO optimises: reward-model score, KL,
gold-judge score), ``loss/``, ``policy/``, ``val/``, ``response/``, ``lr/``, ``time/``, ``throughput/``,
``guardrail/``. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, path: Path | None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.writer: Any = None
        if path is not None and tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional; metrics.jsonl is always written
                pass
            else:
                self.writer = SummaryWriter(str(tensorboard_dir))

    def write(self, entry: dict[str, float]) -> None:
        """Append one step's metrics (``entry["step"]`` is the step number)."""
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, entry["step"])
            self.writer.flush()
        print(summary_line(entry), file=sys.stderr, flush=True)

    def rewrite(self, entries: list[dict[str, float]]) -> None:
        """Replace the file with ``entries`` (after resuming from a checkpoint)."""
        if self.path is None:
            return
        self.path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")


def summary_line(m: dict[str, float]) -> str:
    gold = f" gold {m['objective/gold_score']:+.3f}" if "objective/gold_score" in m else ""
    return (f"ppo step {m['step']}: rm {m['objective/rm_score']:+.3f}{gold} kl/token {m['objective/kl']:.4f} "
            f"beta {m['objective/kl_coef']:.4f} len {m['response/length']:.1f} eos {m['response/eos_rate']:.2f} "
            f"loss pg {m['loss/policy']:+.4f} vf {m['loss/value']:.4f} "
            f"({m['time/step']:.1f} s: generate {m['time/generate']:.1f}, score {m['time/score']:.1f}, "
            f"update {m['time/update']:.1f})")
