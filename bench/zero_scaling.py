"""PPO under DeepSpeed ZeRO-3 with 1, 2 and 4 processes on this machine: time per step, per-process peak RSS and
per-process model-state bytes, against one plain process (no DeepSpeed).

Full fine-tuning in float32 (``--bf16`` for bfloat16) on the demo model: pi_SFT and R_phi as ``bench/ppo_step.py``
makes them, or a pipeline's own SFT and reward outputs (``--sft``/``--reward``, e.g. the demo's). 8 prompts of the
movie-review demo per step in the chat template, as the demo sends them, ``--tokens`` response tokens (a stop token
the model does not produce, so every row decodes the full length), one PPO epoch, one mini-batch. The processes
share the machine's cores: each of N processes runs ``cores // N`` threads (at least one), so every line uses the
same CPU and only the division of the work changes.

Model-state bytes are what a process holds of the four models' weights (a ZeRO-3 process: its shard of each), the
trained models' gradients and the optimizer's state (DeepSpeed's float32 partitions and AdamW's moments), counted
once per tensor storage after the last step; activations, the KV cache and communication buffers are not model
state. Per process, at N processes, ZeRO-3 is meant to hold no more than 1.2 / N of what it holds in one.

    scripts/in-venv python bench/zero_scaling.py [--processes 1 2 4] [--steps 2] [--tokens 24] [--bf16]
        [--sft DIR --reward DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import MODEL, bench_environment, peak_rss_gb, stage_checkpoints


def storages_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one buffer counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def model_state(trainer) -> dict[str, int]:
    """Bytes this process holds of weights, gradients and optimizer state (see the module docstring)."""
    import torch

    from rlhf_trainer.ppo.zero import is_partitioned

    models = [trainer.policy.module, trainer.value.module, trainer.models.reference, trainer.models.reward]
    params = [p for m in models if m is not None for p in m.parameters()]
    weights = storages_bytes(p.ds_tensor if is_partitioned(p) else p.data for p in params)
    gradients, optimizer = 0, 0
    for learner in (trainer.policy, trainer.value):
        engine_optimizer = getattr(getattr(learner, "model", None), "optimizer", None)
        inner = getattr(engine_optimizer, "optimizer", None) or getattr(learner, "optimizer", None)
        moments = [v for state in inner.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
        if hasattr(engine_optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3: float32 partitions, flat gradients
            gradients += storages_bytes([engine_optimizer.grad_partitions_flat_buffer])
            optimizer += storages_bytes([*engine_optimizer.fp32_partitioned_groups_flat, *moments])
        else:  # plain PyTorch: a gradient as large as each trained weight, allocated by every backward pass
            gradients += sum(p.numel() * p.element_size() for p in learner.params)
            optimizer += storages_bytes(moments)
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer,
            "total": weights + gradients + optimizer}


def run_rank(args: argparse.Namespace) -> dict:
    """One process of one configuration (RANK/WORLD_SIZE/MASTER_* in the environment)."""
    import torch

    from rlhf_api.spec import ModelSpec, PPOSpec
    from rlhf_trainer.accelerations.onednn_linear import onednn_linear, onednn_preferred
    from rlhf_trainer.data import builtin_dataset_path, read_rows
    from rlhf_trainer.ppo import distributed
    from rlhf_trainer.ppo.models import load_models
    from rlhf_trainer.ppo.trainer import PPOTrainer
    from rlhf_trainer.ppo.zero import held_parameters

    torch.set_num_threads(args.threads)
    settings = PPOSpec.model_validate({
        "prompts": {"uri": "builtin://movie-reviews/prompts-train"},
        "batchSize": 8, "miniBatchSize": 8, "numPpoEpochs": 1, "totalEpisodes": 8 * (args.steps + 2),
        "learningRate": 1e-6, "seed": 0, "bf16": args.bf16, "stopToken": "<|endoftext|>",
        "generation": {"maxNewTokens": args.tokens, "temperature": 0.7},
        "distributed": {"zeroStage": args.zero_stage},
    })
    prompts = [r["prompt"] for r in read_rows(builtin_dataset_path("builtin://movie-reviews/prompts-train"))]
    torch.manual_seed(0)
    world = distributed.init(always_group=args.zero_stage > 0)
    with onednn_linear(onednn_preferred()):
        models = load_models(Path(args.sft), Path(args.reward), ModelSpec(uri=MODEL), settings, world.device)
        loaded_gb = peak_rss_gb()
        trainer = PPOTrainer(settings, models, prompts, world)
        history = [trainer.train_step() for _ in range(args.steps + 1)][1:]
    held, total = map(sum, zip(*(held_parameters(m) for m in (trainer.policy.module, trainer.value.module,
                                                                models.reference, models.reward))))
    result = {"rank": world.rank, "peak_rss_gb": peak_rss_gb(), "loaded_rss_gb": loaded_gb,
              "held": held, "total": total, "state": model_state(trainer),
              **{k: statistics.fmean(m[f"time/{k}"] for m in history) for k in ("step", "generate", "score",
                                                                              "update")}}
    distributed.shutdown()
    return result


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch(args: argparse.Namespace, processes: int, zero_stage: int, env: dict[str, str]) -> list[dict] | None:
    """``processes`` processes of one configuration; their results by rank, or None when one failed."""
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, __file__, "--child", "--zero-stage", str(zero_stage), "--threads", str(threads),
               "--steps", str(args.steps), "--tokens", str(args.tokens), "--sft", args.sft, "--reward", args.reward,
               *(["--bf16"] if args.bf16 else [])]
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "WORLD_SIZE": str(processes)}
    procs = [subprocess.Popen(command, env={**env, **group, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(processes)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        print("\n".join(o[-3000:] for o in outputs), file=sys.stderr)
        return None
    return [json.loads(next(line[7:] for line in o.splitlines() if line.startswith("RESULT "))) for o in outputs]


def report(name: str, ranks: list[dict], one_zero3: dict | None, seconds: float) -> None:
    worst = max(ranks, key=lambda r: r["state"]["total"])
    gib = 2**30
    share = "" if one_zero3 is None else f" ({worst['state']['total'] / one_zero3['state']['total']:.2f} of 1 process)"
    mean = {k: statistics.fmean(r[k] for r in ranks) for k in ("step", "generate", "score", "update")}
    print(f"zero_scaling {name}: {mean['step']:.2f} s/step (generate {mean['generate']:.2f}, score "
          f"{mean['score']:.2f}, update {mean['update']:.2f}); per process: peak RSS "
          f"{max(r['peak_rss_gb'] for r in ranks):.2f} GiB ({max(r['loaded_rss_gb'] for r in ranks):.2f} once loaded), "
          f"model state {worst['state']['total'] / gib:.2f} GiB{share} = weights {worst['state']['weights'] / gib:.2f} "
          f"+ gradients {worst['state']['gradients'] / gib:.2f} + optimizer {worst['state']['optimizer'] / gib:.2f}, "
          f"{worst['held'] / 1e6:.1f}M of {worst['total'] / 1e6:.1f}M parameters held "
          f"[{len(ranks)} x {max(1, (os.cpu_count() or 1) // len(ranks))} threads, {seconds:.0f} s wall]", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--tokens", type=int, default=24, help="response tokens per rollout")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 (DeepSpeed's bf16 section; autocast in plain)")
    parser.add_argument("--sft", help="pi_SFT folder (default: the demo model, as bench/ppo_step.py)")
    parser.add_argument("--reward", help="R_phi folder (with --sft)")
    parser.add_argument("--no-plain", action="store_true", help="skip the one plain process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--zero-stage", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_rank(args)), flush=True)
        return 0
    if bool(args.sft) != bool(args.reward):
        parser.error("--sft and --reward go together")
    if not args.sft:
        args.sft, args.reward = map(str, stage_checkpoints())
    env = {**bench_environment(glibc=False), "CUDA_VISIBLE_DEVICES": ""}
    runs = [] if args.no_plain else [("plain-1", 1, 0)]
    runs += [(f"zero3-{n}", n, 3) for n in args.processes]
    one_zero3 = None
    for name, processes, stage in runs:
        started = time.monotonic()
        ranks = launch(args, processes, stage, env)
        if ranks is None:
            print(f"zero_scaling {name}: failed", file=sys.stderr)
            return 1
        if name == "zero3-1":
            one_zero3 = ranks[0]
        report(name, ranks, one_zero3 if stage == 3 else None, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
