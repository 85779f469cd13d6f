"""Stage 5, evaluation on held-out prompts: pi_SFT (the reference) against the aligned policy.

Both models answer every held-out prompt (``samplesPerPrompt`` times) with the same sampling settings and seed.
Reported per model: gold-judge mean, mean response length, EOS rate, and when a reward model exists its mean
score and its pair accuracy against the gold judge (:func:`rm_pair_accuracy`: how well R_phi ranks that model's
answers as the judge does, on the held-out prompts; on the policy's answers, a fall from pi_SFT's figure
shows PPO took the policy where the reward model stops tracking the judge); and for the policy: its win rate
against pi_SFT under the gold judge (ties count half) and the mean per-token KL to the reference,
E[log pi(y_t) - log pi_ref(y_t)] over the policy's own response tokens.

Detail: the KL is that of the distributions the responses were sampled from: both models' logits divided by the
sampling temperature, as PPO's rollouts and its ``objective/kl`` use them. (Temperature-1 log-probabilities on
responses sampled at another temperature estimate neither that KL nor the temperature-1 one, which would need
responses sampled at temperature 1.) As in PPO's rollouts, the policy's log-probabilities are those its
sampling pass recorded, and only the reference runs a forward pass over the policy's responses.

Without a PPO policy the stage reports pi_SFT alone. Output: ``metrics.json``, ``samples.jsonl``, and
``evaluation.png`` (judge-score histograms plus every training curve the earlier stages logged).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_api import metric_keys
from rlhf_api.spec import EvaluateSpec, ModelSpec
from rlhf_trainer import models, reward_scoring
from rlhf_trainer.data import load_prompts, write_jsonl
from rlhf_trainer.generation import Sample, sample
from rlhf_trainer.judges import make_judge
from rlhf_trainer.modeling import response_logprobs, sequences
from rlhf_trainer.padding import group_rows, index_batches
from rlhf_trainer.plots import evaluation_figure, read_log
from rlhf_trainer.stages.common import uses_chat_template
from rlhf_trainer.workspace import Workspace


def win_rate(policy: list[float], reference: list[float]) -> float:
    """Fraction of prompts where the policy's score beats the reference's; ties count half."""
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference))
    return wins / len(policy)


def rm_pair_accuracy(prompts: Sequence[str], judge: Sequence[float], rm: Sequence[float]) -> float | None:
    """Of every two answers to the same prompt that the gold judge scores differently, the fraction the reward
    model orders the same way (a tie in the reward model's scores counts half). None when no such pair exists.

    With K answers per prompt (``samplesPerPrompt``) this reads up to K(K-1)/2 pairs per prompt (the demo's four
    answers to each of 60 prompts: up to 360), finer than the reward stage's own held-out pairs; with one answer
    per prompt (the default) there is no pair, and no figure.
    """
    agree = pairs = 0.0
    for rows in group_rows(prompts):
        for i, j in itertools.combinations(rows, 2):
            if judge[i] == judge[j]:
                continue
            pairs += 1
            order = (judge[i] - judge[j]) * (rm[i] - rm[j])
            agree += 1.0 if order > 0 else 0.5 if order == 0 else 0.0
    return agree / pairs if pairs else None


def mean_kl_per_token(policy_logps: list[torch.Tensor], reference_logps: list[torch.Tensor]) -> float:
    """Mean over all response tokens of log pi - log pi_ref (the k1 estimator of KL(pi || pi_ref))."""
    diffs = torch.cat([p - r for p, r in zip(policy_logps, reference_logps)])
    return float(diffs.mean()) if diffs.numel() else 0.0


@torch.inference_mode()
def sample_logprobs(model: Any, samples: Sequence[Sample], pad_token_id: int, temperature: float,
                    batch_size: int = 16) -> list[torch.Tensor]:
    """Log-probability of each response token under ``model`` sampling at ``temperature``: one 1-D tensor per
    sample, computed as PPO computes its rollouts' (:func:`rlhf_trainer.modeling.response_logprobs`), in
    batches of samples of similar lengths (little padding)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    for rows in index_batches(len(samples), batch_size,
                              key=lambda i: (len(samples[i].response_ids), len(samples[i].prompt_ids))):
        batch = sequences([samples[i].prompt_ids for i in rows], [samples[i].response_ids for i in rows],
                          pad_token_id, device)
        logprobs, _ = response_logprobs(model, batch, temperature)
        for i, row, keep in zip(rows, logprobs, batch.mask):
            out[i] = row[keep].cpu()
    return out


def summarize(samples: list[Sample], judge: list[float], rm: list[float] | None) -> dict[str, float]:
    out = {
        metric_keys.JUDGE_MEAN: statistics.fmean(judge),
        "response_tokens": statistics.fmean(len(s.response_ids) for s in samples),
        "eos_rate": sum(s.has_eos for s in samples) / len(samples),
    }
    if rm is not None:
        out[metric_keys.RM_MEAN] = statistics.fmean(rm)
        accuracy = rm_pair_accuracy([s.prompt for s in samples], judge, rm)
        if accuracy is not None:
            out["rm_pair_accuracy"] = accuracy
    return out


def run(ws: Workspace) -> dict[str, Any]:
    settings: EvaluateSpec = ws.config.stage_settings()  # type: ignore[assignment]
    held_out = load_prompts(settings.prompts, ws)
    prompts = [p for p in held_out for _ in range(settings.samples_per_prompt)]
    spec = models.frozen_spec(ws.config.model, models.cuda_bf16())  # both policies only answer: bf16 on a GPU

    ref_model, tokenizer, ref_samples, ref_dir = answer(ws, "reference", spec, settings, prompts)
    samples, dirs = {"sft": ref_samples}, {"sft": ref_dir}
    if "policy" in ws.config.inputs:
        _, _, samples["policy"], dirs["ppo"] = answer(ws, "policy", spec, settings, prompts)
    judge = make_judge(settings.judge.type)
    judge_scores = {name: judge.score(prompts, [s.text for s in out]) for name, out in samples.items()}
    rm_scores: dict[str, list[float]] = {}
    if "reward_model" in ws.config.inputs:
        dirs["reward"] = ws.fetch_dir("reward_model")
        rm_scores = reward_model_scores(dirs["reward"], spec, prompts, samples)

    kl = None
    if "policy" in samples:
        kl = mean_kl_per_token([torch.tensor(s.logprobs) for s in samples["policy"]],
                               sample_logprobs(ref_model, samples["policy"], tokenizer.pad_token_id,
                                               settings.generation.temperature))
    metrics = compare(len(held_out), settings.samples_per_prompt, samples, judge_scores, rm_scores, kl)
    write_outputs(ws.output_dir, metrics, samples, judge_scores, rm_scores, dirs)
    return metrics


def answer(ws: Workspace, role: str, spec: ModelSpec, settings: EvaluateSpec,
           prompts: list[str]) -> tuple[Any, Any, list[Sample], Path]:
    """The model of input ``role`` answering every prompt: (model, tokenizer, samples, its folder)."""
    path = ws.fetch_dir(role)
    tok = models.load_tokenizer(path, spec)
    net = models.freeze(models.load_causal_lm(path, spec, tok).to(models.device()))
    out = sample(net, tok, prompts, settings.generation, batch_size=settings.batch_size, seed=settings.seed,
                 use_chat_template=spec.tokenizer.use_chat_template, desc=f"{role} answering")
    return net, tok, out, path


def reward_model_scores(reward_dir: Path, spec: ModelSpec, prompts: list[str],
                        samples: dict[str, list[Sample]]) -> dict[str, list[float]]:
    """The reward model's score of every answer, by model."""
    tokenizer = models.load_tokenizer(reward_dir, spec)
    rm = models.freeze(models.load_sequence_classifier(reward_dir, spec, tokenizer).to(models.device()))
    chat = uses_chat_template(tokenizer, spec.tokenizer.use_chat_template)
    return {name: reward_scoring.score(rm, tokenizer, prompts, [s.text for s in out], chat=chat)
            for name, out in samples.items()}


def compare(prompts: int, samples_per_prompt: int, samples: dict[str, list[Sample]],
            judge_scores: dict[str, list[float]], rm_scores: dict[str, list[float]],
            kl: float | None) -> dict[str, Any]:
    """The stage's metrics: each model's summary, and the policy's win rate, judge gain and KL against pi_SFT."""
    results = {name: summarize(out, judge_scores[name], rm_scores.get(name)) for name, out in samples.items()}
    metrics: dict[str, Any] = {"prompts": prompts, "samples_per_prompt": samples_per_prompt,
                               **{metric_keys.SFT + k: v for k, v in results["sft"].items()}}
    if "policy" in samples:
        metrics.update({metric_keys.POLICY + k: v for k, v in results["policy"].items()})
        metrics[metric_keys.POLICY + metric_keys.WIN_RATE] = win_rate(judge_scores["policy"], judge_scores["sft"])
        metrics["policy/judge_gain"] = (results["policy"][metric_keys.JUDGE_MEAN]
                                        - results["sft"][metric_keys.JUDGE_MEAN])
        metrics[metric_keys.POLICY + metric_keys.KL_PER_TOKEN] = kl
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def write_outputs(out: Path, metrics: dict[str, Any], samples: dict[str, list[Sample]],
                  judge_scores: dict[str, list[float]], rm_scores: dict[str, list[float]],
                  dirs: dict[str, Path]) -> None:
    """``samples.jsonl``, ``metrics.json`` and ``evaluation.png`` (with the earlier stages' training curves)."""
    write_jsonl(out / "samples.jsonl", (
        {"model": name, "prompt": s.prompt, "response": s.text, "judge": judge_scores[name][i],
         **({"rm": rm_scores[name][i]} if name in rm_scores else {})}
        for name, answers in samples.items() for i, s in enumerate(answers)))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    logs = {"sft": read_log(dirs["sft"] / "trainer_log.jsonl"),
            "reward": read_log(dirs["reward"] / "trainer_log.jsonl" if "reward" in dirs else None),
            "ppo": read_log(dirs["ppo"] / "metrics.jsonl" if "ppo" in dirs else None)}
    evaluation_figure(out / "evaluation.png", {"pi_SFT" if n == "sft" else "policy": v
                                               for n, v in judge_scores.items()}, logs)
