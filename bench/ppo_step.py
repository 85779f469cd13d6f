"""PPO step time and peak memory on the demo model, on this machine's CPU (or its GPU, where it has CUDA).

SmolLM2-135M-Instruct is the policy and the reference; a sequence classifier on the same weights (score head
initialised from a fixed seed) is the reward and the value model. Both are saved once as the earlier stages
save pi_SFT and R_phi (the tokenizer's own pad token added, plain safetensors checkpoints; cached), so PPO
loads them as it loads a pipeline's. 8 prompts of the movie-review demo (about 35
tokens of text; more with the chat template, as the pipeline sends them), 32-token responses (the stop token is
one the model does not produce, so every response has the full length), 1 PPO epoch, 1 mini-batch.
Prompts are the plain prompt text (about 35 tokens); ``--chat-template`` wraps them in SmolLM2's chat template
as the demo pipeline does (about 64 tokens: the template adds a default system prompt).

Each configuration runs in its own process (peak RSS is per process): full fine-tuning and LoRA r=16, in float32
and, where the CPU has bfloat16 instructions, under bfloat16 autocast. One line per figure: seconds per step
(rollout + update, the mean of ``--steps`` steps after one warm-up step), peak RSS (and how much of it the process
held once it had imported its libraries, before loading any model), the work of one step in matrix
products (counted by torch's ``FlopCounterMode`` over one more, untimed step: linear layers, LM head, and attention
where it runs as plain products; SDPA's CPU kernel is not counted) and, in float32, how long that work alone takes
at the machine's measured rate (the floor the step time approaches), the load average (other work on the machine
slows every figure) and the machine's speed around the run (a float32 matrix product and a memory read: on a shared
virtual machine they drift by up to half between hours, with nothing running beside). Each process runs on tcmalloc
where the machine has it, as the trainer does (``rlhf_operator.malloc``); ``--glibc`` measures glibc's malloc
instead. With a CUDA GPU the step runs there (float32 or bf16 autocast, as the configuration's name says) and
the line adds the process's peak GPU memory.

    scripts/in-venv python bench/ppo_step.py [--steps 3] [--only full-fp32 lora-fp32 ...] [--glibc]
        [--gradient-checkpointing] [--accumulation 2] [--chat-template] [--lora-targets q_proj v_proj]
        [--reference]

``--reference`` runs TRL 1.12's PPOTrainer (``bench/trl_ppo_reference.py``) on the same configuration right after
each one and prints how the two compare: the speed target is set against it, and only figures from the
same hour compare.

LoRA adapts every linear layer (``targetModules`` default, all-linear) unless ``--lora-targets`` names others
(peft's own default for Llama-family models, which TRL's PPO examples ran with, is q_proj and v_proj).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_common import CONFIGS, MODEL, bench_environment, child_result, peak_rss_gb, stage_checkpoints
from trl_ppo_reference import VERSION, measure

from rlhf_operator.malloc import LIBRARY


def machine_speed() -> tuple[float, float]:
    """This machine's speed right now: float32 matrix products (GFLOP/s, at a decoder layer's shape) and memory
    reads (GB/s). A shared machine's speed drifts by up to half between hours; these say which hour a figure saw."""
    import torch

    from rlhf_trainer.accelerations.onednn_linear import onednn_linear, onednn_preferred

    a, w, big = torch.randn(528, 576), torch.randn(1536, 576), torch.ones(64 * 2**20)
    with onednn_linear(onednn_preferred()):  # the library the step's products run in
        torch.nn.functional.linear(a, w), big.sum()
        started = time.perf_counter()
        for _ in range(50):
            torch.nn.functional.linear(a, w)
        gflops = 50 * 2 * 528 * 576 * 1536 / (time.perf_counter() - started) / 1e9
    started = time.perf_counter()
    for _ in range(10):
        big.sum()
    return gflops, 10 * big.numel() * 4 / (time.perf_counter() - started) / 1e9


def libraries_rss_gb(checkpoint: Path, lora: bool) -> float:
    """This process's peak RSS once it has imported what the step runs on, before any model is loaded: torch (from
    PyPI a CUDA build: ``import torch`` alone holds 0.5-0.7 GB on this project's machines, without a GPU),
    transformers with the checkpoint's architecture (which imports torch._dynamo), peft under LoRA."""
    import transformers

    getattr(transformers, transformers.AutoConfig.from_pretrained(checkpoint).architectures[0])
    if lora:
        import peft  # noqa: F401

    return peak_rss_gb()


def count_onednn_products() -> None:
    """Teach ``FlopCounterMode`` oneDNN's linear product (``rlhf_trainer.accelerations.onednn_linear``), which it
    does not know: ``x @ W^T`` is 2 * rows * in * out FLOP, as aten's ``mm``."""
    import math

    import torch
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.mkldnn._linear_pointwise)
    def linear_flop(x_shape, w_shape, *_, **__) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]


def run_one(name: str, steps: int, chat_template: bool, accumulation: int, checkpointing: bool,
            lora_targets: list[str]) -> dict:
    """One configuration in this process: warm-up step, then ``steps`` timed steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rlhf_api.spec import ModelSpec, PPOSpec
    from rlhf_trainer.accelerations.onednn_linear import onednn_linear, onednn_preferred
    from rlhf_trainer.data import builtin_dataset_path, read_rows
    from rlhf_trainer.generation import encode_prompts
    from rlhf_trainer.ppo import distributed
    from rlhf_trainer.ppo.models import load_models
    from rlhf_trainer.ppo.trainer import PPOTrainer

    config = CONFIGS[name]
    sft, rm = stage_checkpoints()
    libraries_gb = libraries_rss_gb(sft, config["lora"])
    spec = ModelSpec(uri=MODEL)
    settings = PPOSpec.model_validate({
        "prompts": {"uri": "builtin://movie-reviews/prompts-train"},
        "batchSize": 8, "miniBatchSize": 8, "numPpoEpochs": 1, "totalEpisodes": 8 * (steps + 2),
        "gradientAccumulationSteps": accumulation, "gradientCheckpointing": checkpointing,
        "learningRate": 1e-6, "seed": 0, "bf16": config["bf16"],
        "stopToken": "<|endoftext|>",  # never sampled by the chat model: every response is 32 tokens
        "generation": {"maxNewTokens": 32, "temperature": 0.7},
        "lora": {"enabled": config["lora"], "r": 16, "alpha": 32,
                 **({"targetModules": lora_targets} if config["lora"] else {})},
    })
    prompts = [r["prompt"] for r in read_rows(builtin_dataset_path("builtin://movie-reviews/prompts-train"))]
    torch.manual_seed(0)
    world = distributed.init()
    onednn = onednn_preferred()
    count_onednn_products()
    with onednn_linear(onednn):  # as rlhf-train runs a stage
        trainer = PPOTrainer(settings, load_models(sft, rm, spec, settings, world.device), prompts, world,
                             use_chat_template=chat_template)
        load_before = os.getloadavg()[0]
        history = [trainer.train_step() for _ in range(steps + 1)]
        timed = history[1:]
        peak_gb = peak_rss_gb()
        load_average = (load_before + os.getloadavg()[0]) / 2
        with FlopCounterMode(display=False) as flops:  # one more step, not timed: the work a step does
            trainer.train_step()
    prompt_tokens = statistics.fmean(len(ids) for ids in encode_prompts(trainer.models.tokenizer, prompts,
                                                                         chat_template))
    return {
        "config": name,
        "seconds_per_step": statistics.fmean(m["time/step"] for m in timed),
        "generate": statistics.fmean(m["time/generate"] for m in timed),
        "score": statistics.fmean(m["time/score"] for m in timed),
        "update": statistics.fmean(m["time/update"] for m in timed),
        "response_tokens": statistics.fmean(m["response/length"] for m in timed),
        "prompt_tokens": prompt_tokens,
        "peak_rss_gb": peak_gb,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
        "libraries_rss_gb": libraries_gb,
        "matmul_gflop": flops.get_total_flops() / 1e9,
        "threads": torch.get_num_threads(),
        "malloc": "tcmalloc" if LIBRARY in os.environ.get("LD_PRELOAD", "") else "glibc",
        "float32_linear": "oneDNN" if onednn else "MKL",
        "load_average": load_average,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run")
    parser.add_argument("--chat-template", action="store_true", help="prompts in the chat template (demo format)")
    parser.add_argument("--accumulation", type=int, default=1, choices=(1, 2, 4, 8),
                        help="micro-batches per mini-batch (same gradient, less activation memory)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="spec.ppo.gradientCheckpointing (less activation memory, one more forward pass)")
    parser.add_argument("--lora-targets", nargs="+", default=["all-linear"], metavar="MODULE",
                        help="spec.ppo.lora.targetModules for the LoRA configurations (default all-linear)")
    parser.add_argument("--glibc", action="store_true", help="glibc's malloc, not tcmalloc")
    parser.add_argument("--reference", action="store_true",
                        help="after each configuration, TRL 1.12's PPOTrainer on the same one "
                             "(bench/trl_ppo_reference.py)")
    parser.add_argument("--child", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args.steps, args.chat_template, args.accumulation,
                                                 args.gradient_checkpointing, args.lora_targets)), flush=True)
        return 0

    import torch

    from rlhf_trainer.models import cpu_has_native_bf16, cuda_bf16

    # bf16 configurations where bfloat16 runs in hardware (a bf16 GPU, an AMX or AVX512-BF16 CPU), default or not
    bf16_here = cuda_bf16() if torch.cuda.is_available() else cpu_has_native_bf16()
    names = args.only or [n for n in CONFIGS if not CONFIGS[n]["bf16"] or bf16_here]
    if args.reference and (args.chat_template or args.accumulation != 1 or args.gradient_checkpointing
                           or args.lora_targets != ["all-linear"]):
        parser.error("--reference runs the default configuration only (plain prompts, one micro-batch, no "
                     "gradient checkpointing, LoRA on every linear layer): drop the other options")
    stage_checkpoints()  # made here once, not inside a measured process
    env = bench_environment(args.glibc)
    for name in names:
        started = time.monotonic()
        command = [sys.executable, __file__, "--child", name, "--steps", str(args.steps),
                   "--accumulation", str(args.accumulation)]
        command += ["--chat-template"] if args.chat_template else []
        command += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        command += ["--lora-targets", *args.lora_targets]
        speed_before = machine_speed()  # measured here, outside the process whose peak RSS is reported
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        gflops, read_gbps = (sum(pair) / 2 for pair in zip(speed_before, machine_speed()))
        r = child_result(proc)
        if r is None:
            print(f"ppo_step {name}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        # float32 products at the CPU's measured rate; bf16 products run at another (AMX) rate, and on a GPU
        gpu = r["peak_gpu_gb"] is not None
        floor = ("" if CONFIGS[name]["bf16"] or gpu
                 else f" ({r['matmul_gflop'] / gflops:.1f} s of it at the machine's rate)")
        gpu_memory = f"peak GPU memory {r['peak_gpu_gb']:.2f} GB, " if gpu else ""
        print(f"ppo_step {name}: {r['seconds_per_step']:.2f} s/step (generate {r['generate']:.2f}, "
              f"score {r['score']:.2f}, update {r['update']:.2f}), peak RSS {r['peak_rss_gb']:.2f} GiB "
              f"({r['libraries_rss_gb']:.2f} of it the libraries', before any model), {gpu_memory}"
              f"{r['matmul_gflop']:.0f} GFLOP of matrix products per step{floor}, "
              f"load average {r['load_average']:.2f} on {os.cpu_count()} CPUs, {r['threads']} threads, {r['malloc']}, "
              f"float32 linear layers in {r['float32_linear']}, "
              f"machine now {gflops:.0f} GFLOP/s and {read_gbps:.0f} GB/s "
              f"[8 prompts x {r['prompt_tokens']:.0f} tokens, {r['response_tokens']:.0f}-token responses, "
              f"{8 // args.accumulation} rollouts per forward, "
              f"{'gradient checkpointing, ' if args.gradient_checkpointing else ''}"
              f"{'LoRA on ' + ' '.join(args.lora_targets) + ', ' if CONFIGS[name]['lora'] else ''}"
              f"{time.monotonic() - started:.0f} s wall]", flush=True)
        if args.reference:
            ref = measure(name, args.steps, env)
            speedup, memory = ref["seconds_per_step"] / r["seconds_per_step"], r["peak_rss_gb"] / ref["peak_rss_gb"]
            print(f"ppo_step trl-{VERSION}-{name} (the reference, run next): {ref['seconds_per_step']:.2f} s/step, "
                  f"peak RSS {ref['peak_rss_gb']:.2f} GiB; this engine {speedup:.2f}x as fast, at {memory:.2f} of its "
                  f"peak RSS", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
