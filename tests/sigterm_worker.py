"""``rlhf-train`` with a SIGTERM that this process sends itself while it decodes a rollout, for ``test_zero3.py``:
a pod's process terminated in the middle of generation, at a token the test picks rather than at a moment a timer
happens to hit.

    python tests/sigterm_worker.py ROLLOUT TOKEN ppo --config CONFIG --workspace WORKSPACE
        (SIGTERM before the TOKEN-th decoded token of this process's ROLLOUT-th rollout, both from 1)
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    from rlhf_trainer import cli
    from rlhf_trainer.ppo import trainer as ppo_trainer

    rollout, token = int(argv[0]), int(argv[1])
    sample = ppo_trainer.sample_responses
    rollouts = [0]

    def sample_with_sigterm(*args, interrupted, **kwargs):
        rollouts[0] += 1
        if rollouts[0] != rollout:
            return sample(*args, interrupted=interrupted, **kwargs)
        checks = [0]

        def check() -> bool:  # called before each token
            checks[0] += 1
            if checks[0] == token:
                print(f"test: SIGTERM sent before token {token} of rollout {rollout}", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
            return interrupted()

        return sample(*args, interrupted=check, **kwargs)

    ppo_trainer.sample_responses = sample_with_sigterm
    code = cli.main(argv[2:])
    cli.leave(code)  # as rlhf-train ends
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
