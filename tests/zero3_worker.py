"""One process of a PPO run for ``test_zero3.py``: the trainer built directly (as ``bench/ppo_step.py`` does), every
all-gather of the process counted, and what the test compares written to JSON (and, by the main process, the
policy's final weights to safetensors).

    python tests/zero3_worker.py SFT RM OUT --zero-stage 3 --stop TOKEN [--stop TOKEN]
        (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment, as a launcher sets them)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import PROMPTS

GATHERS = {"count": 0}


def _counted(function):
    def wrapper(*args, **kwargs):
        GATHERS["count"] += 1
        return function(*args, **kwargs)

    return wrapper


# before DeepSpeed starts: its communication backend keeps a reference to the function it picks
for _name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
    if hasattr(dist, _name):
        setattr(dist, _name, _counted(getattr(dist, _name)))



def settings(zero_stage: int, stops: list[str] | None):
    from rlhf_api.spec import PPOSpec

    return PPOSpec.model_validate({
        "prompts": {"uri": "builtin://movie-reviews/prompts-train"}, "batchSize": 4, "miniBatchSize": 4,
        "numPpoEpochs": 2, "totalEpisodes": 8, "learningRate": 1e-3, "seed": 3, "bf16": False,
        "generation": {"maxNewTokens": 8, "temperature": 0.0}, "distributed": {"zeroStage": zero_stage},
        **({"stopTokens": stops} if stops else {})})


def trainer_for(sft: Path, rm: Path, zero_stage: int, stops: list[str] | None):
    from rlhf_api.spec import ModelSpec
    from rlhf_trainer.ppo import distributed
    from rlhf_trainer.ppo.models import load_models
    from rlhf_trainer.ppo.trainer import PPOTrainer

    ppo = settings(zero_stage, stops)
    torch.manual_seed(ppo.seed)
    world = distributed.init(always_group=zero_stage > 0)
    return PPOTrainer(ppo, load_models(sft, rm, ModelSpec(uri=sft.as_uri()), ppo, world.device), PROMPTS, world)


def main(argv: list[str]) -> int:
    from safetensors.torch import save_file

    from rlhf_trainer.ppo import distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("sft", type=Path)
    parser.add_argument("rm", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--stop", action="append")
    args = parser.parse_args(argv)
    trainer = trainer_for(args.sft, args.rm, args.zero_stage, args.stop)

    rollouts: list[dict] = []
    rollout = trainer.rollout

    def counted_rollout(episodes, queries, query_mask):
        before = GATHERS["count"]
        responses, logprobs = rollout(episodes, queries, query_mask)
        rollouts.append({"gathers": GATHERS["count"] - before, "decoded": int(responses.shape[1])})
        return responses, logprobs

    trainer.rollout = counted_rollout
    from rlhf_trainer.ppo.zero import held_parameters

    models = {"policy": trainer.policy.module, "value": trainer.value.module, "reference": trainer.models.reference,
              "reward": trainer.models.reward}
    held = {role: held_parameters(net) for role, net in models.items()}  # before any step: as loaded
    history = trainer.train()
    with trainer.policy.gathered():  # every process takes part; the main one writes
        weights = {name: p.detach().clone().contiguous() for name, p in trainer.policy.module.named_parameters()}
    if trainer.world.is_main:
        save_file(weights, str(args.out.with_suffix(".safetensors")))
    parameters = len(weights)
    args.out.with_name(f"{args.out.stem}-rank{trainer.world.rank}.json").write_text(json.dumps(
        {"history": history, "rollouts": rollouts, "parameters": parameters, "held": held}))
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
