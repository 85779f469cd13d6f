"""PPO under DeepSpeed ZeRO-3 in two processes (gloo on CPU), on a model whose weight matrices all exceed DeepSpeed's
persistence threshold, so each process really holds a shard of each and gathers the rest.

Greedy rollouts whose stop tokens are chosen so that the first process's rows stop after a few tokens while the
second's run to the length limit: each process decodes a different number of tokens. The run must finish, match
one plain process, and gather each weight at most once per rollout, not once per decoded token. Every model, the
frozen reference and reward models too, is partitioned from the moment it is loaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_api.spec import ModelSpec

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
WORKER = Path(__file__).with_name("zero3_worker.py")
COMPARED = ("objective/rm_score", "objective/kl", "loss/policy", "loss/value", "policy/approxkl", "val/mean",
            "response/length")


@pytest.fixture(scope="module")
def sharded_inputs(tmp_path_factory):
    """pi_SFT and R_phi of a 2-layer Llama with hidden size 512: every matrix above 1e5 elements."""
    from tiny_models import build_tiny_causal_lm

    from rlhf_trainer import models as hf_models

    root = tmp_path_factory.mktemp("zero3")
    base = build_tiny_causal_lm(root / "base", hidden_size=512, intermediate_size=1024)
    spec = ModelSpec(uri=base.as_uri())
    torch.manual_seed(0)
    tokenizer = hf_models.load_tokenizer(base, spec)
    hf_models.save_plain(hf_models.load_causal_lm(base, spec, tokenizer), tokenizer, root / "sft")
    hf_models.save_plain(hf_models.load_sequence_classifier(root / "sft", spec, tokenizer), tokenizer, root / "rm")
    return root / "sft", root / "rm"


def early_stops(sft: Path, rm: Path) -> list[str]:
    """Two tokens that end each of the first process's first-step rows within three tokens (greedy decoding) and
    appear nowhere in the second process's rows."""
    sys.path.insert(0, str(WORKER.parent))
    from zero3_worker import trainer_for

    from rlhf_trainer.generation import encode_prompts
    from rlhf_trainer.padding import left_pad

    trainer = trainer_for(sft, rm, 0, None)
    episodes = trainer.episodes_of_step(0)  # one process: all four episodes of the first step
    prompts = [trainer.prompt_of(e) for e in episodes]
    queries, mask = left_pad(encode_prompts(trainer.models.tokenizer, prompts, trainer.chat), trainer.pad_id)
    free = trainer.rollout(episodes, queries, mask)[0].tolist()
    first, second = free[:2], free[2:]  # two processes: episodes 0-1 on rank 0, 2-3 on rank 1
    later = {token for row in second for token in row}
    stops = [next((t for t in row[:3] if t not in later), None) for row in first]
    assert None not in stops, f"no early token of {first} is absent from {second}"
    return trainer.models.tokenizer.convert_ids_to_tokens(stops)


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(sft: Path, rm: Path, out: Path, processes: int, zero_stage: int, stops: list[str]) -> list[dict]:
    port = free_port()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
           "WORLD_SIZE": str(processes), "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}
    command = [sys.executable, str(WORKER), str(sft), str(rm), str(out), "--zero-stage", str(zero_stage),
               *[arg for stop in stops for arg in ("--stop", stop)]]
    procs = [subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(processes)]
    try:
        outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0] * processes, "\n".join(o[-3000:] for o in outputs)
    return [json.loads(out.with_name(f"{out.stem}-rank{rank}.json").read_text()) for rank in range(processes)]


def test_zero3_across_two_processes_that_decode_different_lengths_matches_one_process(sharded_inputs, tmp_path):
    from safetensors.torch import load_file

    sft, rm = sharded_inputs
    stops = early_stops(sft, rm)
    one = run(sft, rm, tmp_path / "one", 1, 0, stops)
    two = run(sft, rm, tmp_path / "two", 2, 3, stops)

    # every model, trained or frozen, partitioned from loading on: each process holds about half of each
    for rank in two:
        for role, (held, total) in rank["held"].items():
            assert held <= 0.55 * total, (role, held, total)
    assert all(held == total for held, total in one[0]["held"].values())

    # the first step's rollouts: the first process's rows stopped early, the second's ran to the limit
    assert two[0]["rollouts"][0]["decoded"] <= 3 < two[1]["rollouts"][0]["decoded"] == 8
    for got, want in zip(two[0]["history"], one[0]["history"]):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), (key, got["step"])
    plain, sharded = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert sorted(plain) == sorted(sharded)
    for name, weight in plain.items():
        torch.testing.assert_close(sharded[name], weight, atol=1e-5, rtol=1e-4, msg=name)

    # each weight gathered at most once per rollout (those still gathered from the update are not gathered again),
    # however many tokens a process decodes: gathering per decoded token would take eight times as many here
    for rank in two:
        assert all(0 < rollout["gathers"] <= rank["parameters"] for rollout in rank["rollouts"]), rank["rollouts"]


def test_sigterm_to_one_process_while_it_decodes_checkpoints_every_process_and_the_resumed_run_is_the_same(
        sharded_inputs, tmp_path):
    """Two ZeRO-3 processes of ``rlhf-train ppo``; the second is terminated before the fourth token of its second
    rollout (the first process is decoding too, and keeps going: no collective runs while processes decode). Both
    agree to stop after the rollout, store their shards of the state after step 1 and exit 143; two new processes
    resume and finish with the metrics and the published weights of an uninterrupted run."""
    from safetensors.torch import load_file
    from test_ppo_stage import CPU, finish, output_dir, rlhf_train, stage_config, steps, trainer_environment

    from rlhf_api.entrypoint import EXIT_PREEMPTED

    sft, rm = sharded_inputs
    inputs = (sft, rm, ModelSpec(uri=sft.as_uri()))
    settings = dict(totalEpisodes=12, miniBatchSize=4, saveSteps=1, distributed={"nodes": 2, "zeroStage": 3},
                    stopToken="<|endoftext|>",  # never sampled by the random model: every row decodes 10 tokens
                    storage={"keepCheckpoints": True})

    def two_processes(config: Path, workspace: Path, first_command: list[str] | None = None,
                      second_command: list[str] | None = None) -> tuple[list[int], list[str]]:
        port = free_port()
        procs = []
        for rank, command in enumerate((first_command, second_command)):
            env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK="0",
                       **CPU)
            if command is None:
                procs.append(rlhf_train(config, workspace / f"rank{rank}", **env))
            else:
                procs.append(subprocess.Popen(
                    [sys.executable, *command, "ppo", "--config", str(config), "--workspace",
                     str(workspace / f"rank{rank}")],
                    env={**trainer_environment(**env), "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [finish(p) for p in procs]
        return [p.returncode for p in procs], outputs

    straight = stage_config(inputs, tmp_path / "a", "straight", **settings)
    codes, outputs = two_processes(straight, tmp_path / "a")
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "ppo: ZeRO-3, process 1 of 2 holds policy" in outputs[1]
    expected = steps(output_dir(straight) / "metrics.jsonl")

    config = stage_config(inputs, tmp_path / "b", "interrupted", **settings)
    sigterm = [str(WORKER.with_name("sigterm_worker.py")), "2", "4"]
    codes, outputs = two_processes(config, tmp_path / "b", second_command=sigterm)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], "\n".join(o[-3000:] for o in outputs)
    assert "test: SIGTERM sent before token 4 of rollout 2" in outputs[1]
    pointer = json.loads((output_dir(config) / "checkpoints" / "latest.json").read_text())
    assert (pointer["global_step"], pointer["processes"]) == (1, 2)
    for rank in (0, 1):  # each process stored its own shard
        assert (output_dir(config) / "checkpoints" / pointer["checkpoint"] / f"rank-{rank}" / "manifest.json").exists()
    assert not (output_dir(config) / "manifest.json").exists()

    codes, outputs = two_processes(config, tmp_path / "c")
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    assert "(step 1)" in outputs[0]  # resumed from the checkpoint of step 1
    resumed = steps(output_dir(config) / "metrics.jsonl")
    assert [e["step"] for e in resumed] == [e["step"] for e in expected] == [1, 2, 3]
    for got, want in zip(resumed, expected):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (key, got["step"])
    final, uninterrupted = (load_file(output_dir(c) / "model.safetensors") for c in (config, straight))
    assert sorted(final) == sorted(uninterrupted)
    for name, weight in uninterrupted.items():
        assert weight.numel() > 0
        torch.testing.assert_close(final[name], weight, rtol=1e-5, atol=1e-6, msg=name)
