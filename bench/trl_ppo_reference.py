"""The reference the PPO engine's speed target is set against: TRL 1.12's PPOTrainer (the last TRL with one,
``trl.experimental.ppo``) on ``bench/ppo_step.py``'s configuration, in a process of its own.

Same checkpoints (pi_SFT for the policy and the reference, R_phi for the reward and the value model), same
prompts (plain text, left-padded), batch 8, 32-token responses at temperature 0.7 with no stop token (every
response has the full length), 1 PPO epoch, 1 mini-batch, on the CPU in float32 or, for the bf16
configurations, with TRL's ``bf16=True`` (accelerate's bfloat16 autocast around float32 weights). TRL's step is
timed from one ``on_step_end`` to the next, the first step is the warm-up. With LoRA (r=16, alpha 32, every linear
layer) TRL adapts the policy only and trains the value model in full, as its PPOTrainer does.

TRL 1.12 is fetched once from the package index as a wheel (no dependencies: it runs on this project's
transformers, accelerate and peft) and unpacked under the cache folder; the process imports it ahead of the
installed TRL. ``bench/ppo_step.py --reference`` runs this right after each of its configurations, so the two
figures come from the same hour of a machine whose speed drifts.

    scripts/in-venv python bench/trl_ppo_reference.py --config full-fp32|lora-fp32|full-bf16|lora-bf16 [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from bench_common import CONFIGS, bench_environment, child_result, peak_rss_gb, stage_checkpoints

VERSION = "1.12.0"


def trl_site() -> Path:
    """A folder holding TRL ``VERSION``'s package, to put first on ``PYTHONPATH`` (fetched once, cached)."""
    from rlhf_api.cache import cache_root

    site = cache_root() / "bench" / f"trl-{VERSION}"
    if not (site / ".complete").exists():
        wheels = site.with_name(site.name + ".download")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"trl=={VERSION}",
                        "--dest", str(wheels)], check=True)
        with zipfile.ZipFile(next(wheels.glob(f"trl-{VERSION}-*.whl"))) as wheel:
            wheel.extractall(site)
        (site / ".complete").touch()
    return site


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with TRL ``VERSION`` imported ahead of the installed one."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(trl_site()), env.get("PYTHONPATH")]))}


def run(name: str, steps: int) -> dict:
    """TRL's PPOTrainer for a warm-up step and ``steps`` timed steps, in this process."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from rlhf_trainer.data import builtin_dataset_path, read_rows

    if trl.__version__ != VERSION:
        raise SystemExit(f"trl {trl.__version__} imported from {trl.__file__}, not {VERSION}: run through child_env")
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    sft, rm = stage_checkpoints()
    tokenizer = AutoTokenizer.from_pretrained(sft, padding_side="left")
    prompts = [r["prompt"] for r in read_rows(builtin_dataset_path("builtin://movie-reviews/prompts-train"))]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]})
    torch.manual_seed(0)
    lora = None
    if CONFIGS[name]["lora"]:
        from peft import LoraConfig

        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    config = PPOConfig(
        output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "trl-ppo-reference"), report_to="none",
        save_strategy="no", logging_steps=10_000, num_sample_generations=0, seed=0,
        use_cpu=True, bf16=CONFIGS[name]["bf16"],
        per_device_train_batch_size=8, local_rollout_forward_batch_size=8, gradient_accumulation_steps=1,
        num_mini_batches=1, num_ppo_epochs=1, total_episodes=8 * (steps + 1), learning_rate=1e-6,
        response_length=32, temperature=0.7, stop_token_id=None,
    )
    ended: list[float] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ended.append(time.perf_counter())

    trainer = PPOTrainer(
        args=config, processing_class=tokenizer, train_dataset=dataset, peft_config=lora, callbacks=[StepEnds()],
        model=AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32),
        ref_model=None if lora else AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32),
        reward_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32),
        value_model=AutoModelForSequenceClassification.from_pretrained(rm, num_labels=1, dtype=torch.float32),
    )
    trainer.train()
    return {
        "seconds_per_step": statistics.fmean(b - a for a, b in zip(ended, ended[1:])),
        "steps": len(ended) - 1,
        "peak_rss_gb": peak_rss_gb(),
        "threads": torch.get_num_threads(),
    }


def measure(name: str, steps: int, env: dict[str, str]) -> dict:
    """``run`` in a process of its own (peak RSS is per process) that imports TRL ``VERSION``."""
    stage_checkpoints()  # made here once, not inside the measured process
    proc = subprocess.run([sys.executable, __file__, "--child", "--config", name, "--steps", str(steps)],
                          env=child_env(env), capture_output=True, text=True)
    result = child_result(proc)
    if result is None:
        raise RuntimeError(f"TRL {VERSION} PPO ({name}) failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.config, args.steps)), flush=True)
        return 0
    r = measure(args.config, args.steps, bench_environment(glibc=False))
    print(f"trl-{VERSION} {args.config}: {r['seconds_per_step']:.2f} s/step, peak RSS {r['peak_rss_gb']:.2f} GiB "
          f"[{r['steps']} timed steps, {r['threads']} threads]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
