"""The PPO loop for RLHF, one step at a time; :meth:`PPOTrainer.train_step` reads as the algorithm.

One step, as in Ziegler et al. 2019 and Huang et al. 2024 ("The N+ Implementation Details of RLHF with PPO"):

* :meth:`~PPOTrainer.make_experience`:
  1. rollout: sample a response to each of this step's prompts with the current policy;
  2. score: truncate at the stop token, score with the reward model, one forward pass of the reference (the
     policy's log-probabilities come from the sampling pass; after sampling from a bfloat16 copy, from one forward
     pass of the policy);
  3. rewards: a KL penalty on every token, the score on the last one;
  4. values and advantages: one forward pass of the value model, GAE, advantages whitened over the batch;
* :meth:`~PPOTrainer.update`: 5. PPO epochs over shuffled mini-batches: clipped policy loss, clipped value loss;
* 6. adapt the KL coefficient; :meth:`~PPOTrainer.record` logs the step's metrics and guardrail flags;
* :meth:`~PPOTrainer.train`: 7. checkpoint every ``saveSteps`` steps (and when stopped by SIGTERM).

Prefixes: ``b_`` would be the batch, but the batch is :class:`Experience` itself; ``mini`` and ``micro`` are a
mini-batch (one optimizer step) and a micro-batch (one forward/backward pass).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_api.spec import PPOSpec
from rlhf_trainer import seeding
from rlhf_trainer.accelerations.decoding_weights import decoding_weights
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.generation import encode_prompts, sample_responses, stop_token_ids
from rlhf_trainer.judges import Judge
from rlhf_trainer.modeling import attention_kernel, autocast, response_logprobs
from rlhf_trainer.padding import left_pad
from rlhf_trainer.ppo.distributed import World
from rlhf_trainer.ppo.experience import Experience, Rollout
from rlhf_trainer.ppo.functional import (
    apply_missing_eos_penalty,
    gae,
    kl_per_token,
    masked_mean,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    truncate_at_stop,
    value_loss,
)
from rlhf_trainer.ppo.guardrails import Guardrails
from rlhf_trainer.ppo.kl_control import make_kl_controller
from rlhf_trainer.ppo.learner import make_learner
from rlhf_trainer.ppo.metrics_log import MetricsLog
from rlhf_trainer.ppo.models import PPOModels, response_values, uses_bf16
from rlhf_trainer.ppo.rollout import BF16Sampler, episode_generators
from rlhf_trainer.reward_scoring import reward_scores

TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"


class Laps:
    """Seconds spent in each phase of a step, read off ``clock`` at the end of each."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.started = self.last = clock()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = self.clock()
        self.seconds[phase], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return self.last - self.started


class Stopped(Exception):
    """SIGTERM arrived: the trainer stopped between steps (its state is that after ``trainer.step`` steps)."""


@dataclass(frozen=True)
class Sizes:
    """Batch sizes derived once from the spec and the number of processes (the spec itself is never changed)."""

    steps: int  # PPO steps in the run
    local_batch: int  # rollouts per process per step
    local_mini_batch: int  # rollouts per process per optimizer step
    micro_batch: int  # rollouts per forward/backward pass
    updates: int  # optimizer steps in the run (the LR schedule's length)

    @classmethod
    def of(cls, s: PPOSpec, processes: int) -> Sizes:
        if s.mini_batch_size % (processes * s.gradient_accumulation_steps):
            raise ConfigError(
                f"spec.ppo.miniBatchSize ({s.mini_batch_size}) must be divisible by the number of processes "
                f"({processes}) times gradientAccumulationSteps ({s.gradient_accumulation_steps})"
            )
        local_mini_batch = s.mini_batch_size // processes
        steps = s.total_episodes // s.batch_size
        return cls(steps=steps, local_batch=s.batch_size // processes, local_mini_batch=local_mini_batch,
                   micro_batch=local_mini_batch // s.gradient_accumulation_steps,
                   updates=steps * s.num_ppo_epochs * (s.batch_size // s.mini_batch_size))


class PPOTrainer:
    """PPO on a prompt list with the four models of :class:`PPOModels`, in one process or several."""

    def __init__(
        self,
        settings: PPOSpec,
        models: PPOModels,
        prompts: Sequence[str],
        world: World,
        *,
        use_chat_template: bool = True,
        judge: Judge | None = None,
        log: MetricsLog | None = None,
    ) -> None:
        self.settings = settings
        self.models = models
        self.prompts = list(prompts)
        self.world = world
        self.device = world.device
        self.sizes = Sizes.of(settings, world.size)
        self.judge = judge
        self.log = log or MetricsLog(None)
        tokenizer = models.tokenizer
        self.chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.reward_chat = use_chat_template and bool(getattr(models.reward_tokenizer, "chat_template", None))
        self.pad_id = tokenizer.pad_token_id
        named = settings.stop_tokens or ([settings.stop_token] if settings.stop_token else None)
        self.stop_ids = stop_token_ids(models.policy, tokenizer, named,
                                       field="spec.ppo.stopTokens" if settings.stop_tokens else "spec.ppo.stopToken")
        self.bf16 = uses_bf16(settings)
        self.temperature = settings.generation.temperature

        def learner(module: torch.nn.Module, lr: float) -> Any:
            return make_learner(module, lr=lr, settings=settings, total_updates=self.sizes.updates,
                                micro_batch=self.sizes.micro_batch, world=world, bf16=self.bf16)

        self.policy = learner(models.policy, settings.learning_rate)
        # Under bf16, full fine-tuning samples from a bfloat16 copy (LoRA and ZeRO-3 sample under autocast).
        self.sampler = (BF16Sampler(self.policy.module) if self.bf16 and not settings.lora.enabled
                        and settings.distributed.zero_stage < 3 else None)
        self.value = learner(models.value, settings.value_learning_rate or settings.learning_rate)
        # With one mini-batch per epoch, the first epoch's value update would repeat the value pass's forward pass
        # (same weights, same rows): the value pass then keeps its graph and is that update (one forward saved).
        self.value_pass_trains = self.sizes.local_mini_batch == self.sizes.local_batch
        self.kl_ctl = make_kl_controller(settings.kl_coef, settings.target_kl, settings.kl_horizon)
        self.guardrails = Guardrails(settings.guardrails)
        self.step = 0  # PPO steps done; also the data position (see episodes_of_step)
        self.history: list[dict[str, float]] = []  # every step's metrics
        self.stop_requested = False  # set by the SIGTERM handler
        self._prompt_orders: dict[int, torch.Tensor] = {}

    # -------------------------------------------------------------------------------------------- loop

    def train(self, checkpoint: Callable[[PPOTrainer], None] | None = None) -> list[dict[str, float]]:
        """Run the remaining steps; checkpoint every ``saveSteps`` steps, and before raising :class:`Stopped`."""
        while self.step < self.sizes.steps:
            try:
                self.train_step()
                if self.world.any(self.stop_requested):
                    raise Stopped(f"stopped after step {self.step}")
            except Stopped:
                if checkpoint is not None:
                    checkpoint(self)
                raise
            if checkpoint is not None and self.step % self.settings.save_steps == 0 and self.step < self.sizes.steps:
                checkpoint(self)
        return self.history

    def clock(self) -> float:
        """Seconds on a monotonic clock once the device has finished the work queued so far (a GPU runs behind the
        Python that queues its kernels: without waiting, time would land in whichever phase waits next)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def train_step(self) -> dict[str, float]:
        """One PPO step: experience from the current policy, the PPO epochs on it, KL control, the step's metrics."""
        laps = Laps(self.clock)
        experience = self.make_experience(self.episodes_of_step(self.step), laps)
        update_stats = self.update(experience)
        laps.lap("update")
        kl_per_response = self.mean(experience.kl.sum(1))
        beta = self.kl_ctl.value  # the coefficient this step's rewards were computed with
        self.kl_ctl.update(kl_per_response, self.settings.batch_size)
        self.step += 1
        return self.record(experience, update_stats, beta, kl_per_response, laps)

    # ----------------------------------------------------------------------------------- experience

    def make_experience(self, episodes: Sequence[int], laps: Laps) -> Experience:
        """Steps 1-4: rollouts of ``episodes``, their scores, per-token rewards, values and advantages."""
        prompts = [self.prompt_of(e) for e in episodes]
        queries, query_mask = left_pad(encode_prompts(self.models.tokenizer, prompts, self.chat), self.pad_id)
        queries, query_mask = queries.to(self.device), query_mask.to(self.device)
        responses, logprobs = self.rollout(episodes, queries, query_mask)
        self.raise_if_stopped()
        laps.lap("generate")

        rollout, texts = self.score_rollouts(episodes, prompts, queries, query_mask, responses, logprobs)
        gold = self.judge.score(prompts, texts) if self.judge is not None else None
        laps.lap("score")
        self.raise_if_stopped()

        kl, rewards = self.rewards(rollout)
        values, value_loss_sums = self.value_pass(rollout, rewards)
        advantages, returns = gae(rewards, values, rollout.mask, self.settings.gamma, self.settings.lam)
        advantages = masked_whiten(advantages, rollout.mask, reduce=self.world.all_sum)
        return Experience(**_fields(dataclasses.replace(rollout, values=values)), rewards=rewards, kl=kl,
                          advantages=advantages, returns=returns,
                          gold_scores=None if gold is None else torch.tensor(gold, device=self.device),
                          value_loss_sums=value_loss_sums)

    def rollout(self, episodes: Sequence[int], queries: torch.Tensor,
                query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 1: sample a response to each query with the current policy, and each token's log-probability.

        KV cache, no autograd; under ZeRO-3 the full weights, gathered once for the rollout (no collective per
        token, so processes may decode different numbers of tokens); under bf16 from a bfloat16 copy of the current
        weights; each linear layer from a copy made for decoding (:mod:`rlhf_trainer.accelerations.decoding_weights`).
        The log-probabilities come from the sampling pass itself: no extra forward pass.
        """
        sampler = self.sampler.refreshed() if self.sampler else self.policy.module  # not DeepSpeed's engine
        with (self.policy.gathered(), autocast(self.device, self.bf16 and self.sampler is None),
              attention_kernel(sampler, "sdpa"), decoding_weights(sampler, rows=len(episodes))):
            return sample_responses(
                sampler, queries, query_mask, self.settings.generation, stop_token_ids=self.stop_ids,
                pad_token_id=self.pad_id, generators=episode_generators(self.settings.seed, episodes, self.device),
                interrupted=lambda: self.stop_requested)

    def score_rollouts(self, episodes: Sequence[int], prompts: Sequence[str], queries: torch.Tensor,
                       query_mask: torch.Tensor, responses: torch.Tensor,
                       logprobs: torch.Tensor) -> tuple[Rollout, list[str]]:
        """Step 2: truncate at the stop token, score with the reward model, and run the reference once over the
        responses (in micro-batches). The rollout's values are zero until :meth:`value_pass`."""
        settings = self.settings
        responses, lengths, has_stop = truncate_at_stop(responses, self.stop_ids, self.pad_id)
        mask = response_mask(lengths, responses.shape[1])
        texts = [self.models.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                 for row, n in zip(responses.tolist(), lengths.tolist())]

        with torch.no_grad():
            # The reward model reads text in the format it was trained on (chat template over user + assistant).
            with self.models.reward_model() as reward_model, autocast(self.device, self.bf16):
                # the same passes on every process, whatever its prompts (ZeRO-3 gathers weights per pass)
                rm_scores = reward_scores(reward_model, self.models.reward_tokenizer, prompts, texts,
                                          chat=self.reward_chat, batch_size=self.sizes.micro_batch,
                                          group_prompts=False)
            scores = apply_missing_eos_penalty(rm_scores, has_stop, settings.missing_eos_penalty)
            rollout = Rollout(episodes=torch.tensor(list(episodes), device=self.device), queries=queries,
                              query_mask=query_mask, responses=responses, mask=mask, lengths=lengths,
                              has_stop=has_stop, logprobs=logprobs * mask, ref_logprobs=torch.zeros_like(logprobs),
                              values=torch.zeros_like(logprobs), rm_scores=rm_scores, scores=scores)
            with self.models.reference_of(self.policy.model) as reference, autocast(self.device, self.bf16):
                for rows in self.micro_batch_rows(len(episodes)):
                    ref_logprobs = response_logprobs(reference, rollout.select(rows), self.temperature)[0]
                    rollout.ref_logprobs[rows, :ref_logprobs.shape[1]] = ref_logprobs
            if self.sampler is not None:
                self.recompute_logprobs(rollout)
        return rollout, texts

    def recompute_logprobs(self, rollout: Rollout) -> None:
        """The rollout's log-probabilities again, from the model being trained rather than the bfloat16 copy that
        sampled (whose norms and softmax ran in bfloat16, where autocast runs them in float32): the first epoch's
        ratios are then 1, as PPO assumes. One forward pass of the policy, without gradients."""
        with autocast(self.device, self.bf16):
            for rows in self.micro_batch_rows(len(rollout.lengths)):
                logprobs = response_logprobs(self.policy.model, rollout.select(rows), self.temperature)[0]
                rollout.logprobs[rows] = 0.0
                rollout.logprobs[rows, :logprobs.shape[1]] = logprobs

    def rewards(self, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: the per-token KL estimate, and rewards: -beta * KL on every token plus the score on the last.

        Returns:
            kl (B, R), rewards (B, R).
        """
        settings = self.settings
        kl = kl_per_token(rollout.logprobs, rollout.ref_logprobs, settings.kl_estimator) * rollout.mask
        rewards = token_rewards(rollout.scores, kl, rollout.mask, rollout.lengths, self.kl_ctl.value)
        if settings.whiten_rewards:
            rewards = masked_whiten(rewards, rollout.mask, shift_mean=False, reduce=self.world.all_sum)
        return kl, rewards

    def value_pass(self, rollout: Rollout,
                   rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Step 4's values V_old: one forward pass of the value model over the rollouts, in micro-batches.

        With :attr:`value_pass_trains` this pass is also the first epoch's value update: each micro-batch keeps
        its graph just long enough for its value loss (a rollout's GAE returns need only its own rewards and
        values) and its backward pass. Returns the values (no graph) and that update's loss sums (None when the
        update is left to :meth:`update`).
        """
        trains = self.value_pass_trains
        values = torch.zeros_like(rollout.logprobs)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        tokens = self.world.all_sum(rollout.mask.sum().float()).clamp(min=1)  # the update's token count
        for rows in self.micro_batch_rows(len(rollout.lengths)):
            micro = rollout.select(rows)
            with torch.set_grad_enabled(trains), autocast(self.device, self.bf16):
                micro_values = response_values(self.value.model, micro)
            width = micro_values.shape[1]
            values[rows, :width] = micro_values.detach()
            if trains:
                returns = gae(rewards[rows, :width], micro_values.detach(), micro.mask, self.settings.gamma,
                              self.settings.lam)[1]
                self.value_backward(micro_values, micro_values.detach(), returns, micro.mask, tokens, sums)
        return values, (sums if trains else None)

    # ------------------------------------------------------------------------------------------ update

    def update(self, experience: Experience) -> dict[str, float]:
        """Step 5: ``numPpoEpochs`` passes over the batch in shuffled mini-batches, one optimizer step each.

        When the value pass already ran the first epoch's value update (``experience.value_loss_sums``; its
        gradients are in place), that mini-batch only steps the value optimizer.
        """
        settings, sizes = self.settings, self.sizes
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        sums.update(experience.value_loss_sums or {})
        grad_norms: dict[str, list[float]] = defaultdict(list)
        for epoch in range(settings.num_ppo_epochs):
            order = torch.randperm(sizes.local_batch,
                                   generator=seeding.generator(settings.seed, "order", self.step, epoch))
            for mini_rows in order.to(self.device).split(sizes.local_mini_batch):
                value_done = experience.value_loss_sums is not None and epoch == 0
                self.mini_batch_backward(experience.select(mini_rows), sums, train_value=not value_done)
                grad_norms["policy/grad_norm"].append(self.policy.step())
                grad_norms["val/grad_norm"].append(self.value.step())
        names = sorted(sums)
        totals = self.world.all_sum(torch.stack([sums[n].float() for n in names]))
        tokens = totals[names.index("tokens")].clamp(min=1)
        stats = {n: float(t / tokens) for n, t in zip(names, totals) if n != "tokens"}
        stats.update({n: sum(v) / len(v) for n, v in grad_norms.items()})
        return stats

    def mini_batch_backward(self, mini: Experience, sums: dict[str, torch.Tensor], *, train_value: bool) -> None:
        """The value and policy losses of one mini-batch, micro-batch by micro-batch, backpropagated; each loss is
        a token mean over the whole mini-batch (every micro-batch of every process)."""
        tokens = self.world.all_sum(mini.mask.sum().float()).clamp(min=1)
        for micro_rows in self.micro_batch_rows(len(mini.lengths)):
            micro = mini.select(micro_rows)
            # The value loss first: at most one model's autograd graph is alive at a time.
            if train_value:
                with autocast(self.device, self.bf16):
                    values = response_values(self.value.model, micro)
                self.value_backward(values, micro.values, micro.returns, micro.mask, tokens, sums)

            with autocast(self.device, self.bf16):
                logprobs, entropy = response_logprobs(self.policy.model, micro, self.temperature, with_entropy=True)
            pg_loss, pg_clipped, approx_kl = policy_loss(logprobs, micro.logprobs, micro.advantages, micro.mask,
                                                         self.settings.cliprange)
            self.policy.backward(pg_loss.sum() / tokens)

            mask = micro.mask
            sums["loss/policy"] += pg_loss.detach().sum()
            sums["policy/clipfrac"] += pg_clipped.sum()
            sums["policy/approxkl"] += (approx_kl * mask).sum()
            sums["policy/entropy"] += (entropy * mask).sum()
            sums["tokens"] += mask.sum()

    def value_backward(self, values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, tokens: torch.Tensor, sums: dict[str, torch.Tensor]) -> None:
        """The clipped value loss of a micro-batch (a share of the mini-batch's token mean), backpropagated."""
        vf_loss, vf_clipped = value_loss(values, old_values, returns, mask, self.settings.cliprange_value)
        self.value.backward(self.settings.vf_coef * vf_loss.sum() / tokens)
        sums["loss/value"] += vf_loss.detach().sum()
        sums["val/clipfrac"] += vf_clipped.sum()

    # ----------------------------------------------------------------------------------------- logging

    def record(self, experience: Experience, update_stats: dict[str, float], beta: float, kl_per_response: float,
               laps: Laps) -> dict[str, float]:
        """Step 6: the step's metrics (over every process) and guardrail flags, kept and logged."""
        mask, scores = experience.mask, self.mean(experience.scores)
        metrics = {
            "step": self.step,
            "episodes": self.step * self.settings.batch_size,
            "objective/rm_score": self.mean(experience.rm_scores),
            "objective/scores": scores,
            "objective/kl": self.token_mean(experience.kl, mask),
            "objective/kl_sum": kl_per_response,
            "objective/kl_coef": beta,
            "objective/non_score_reward": -beta * kl_per_response,
            "objective/rlhf_reward": scores - beta * kl_per_response,
            "objective/entropy": self.token_mean(-experience.logprobs, mask),
            **({"objective/gold_score": self.mean(experience.gold_scores)}
               if experience.gold_scores is not None and experience.gold_scores.numel() else {}),
            **update_stats,
            "val/mean": self.token_mean(experience.values, mask),
            "val/returns": self.token_mean(experience.returns, mask),
            "response/length": self.mean(experience.lengths.float()),
            "response/eos_rate": self.mean(experience.has_stop.float()),
            "lr/policy": self.policy.lr,
            "lr/value": self.value.lr,
            **{f"time/{phase}": seconds for phase, seconds in laps.seconds.items()},  # update: the value pass too
            "time/step": laps.total,
            "throughput/tokens_per_s": float(self.world.all_sum(experience.lengths.sum().float())) / laps.total,
        }
        metrics.update(self.guardrails.check(metrics))
        self.history.append(metrics)
        self.log.write(metrics)
        return metrics

    def micro_batch_rows(self, rows: int) -> tuple[torch.Tensor, ...]:
        """Row indices ``0 .. rows-1`` in micro-batches (one forward/backward pass each)."""
        return torch.arange(rows, device=self.device).split(self.sizes.micro_batch)

    # ------------------------------------------------------------------------------------------- data

    def episodes_of_step(self, step: int) -> list[int]:
        """This process's episodes of a step: its contiguous share of the step's global episode range."""
        first = step * self.settings.batch_size + self.world.rank * self.sizes.local_batch
        return list(range(first, first + self.sizes.local_batch))

    def prompt_of(self, episode: int) -> str:
        """The prompt of a global episode: prompts are visited in a fresh seeded order each pass over them."""
        data_epoch, position = divmod(episode, len(self.prompts))
        if data_epoch not in self._prompt_orders:
            order = torch.randperm(len(self.prompts),
                                   generator=seeding.generator(self.settings.seed, "prompts", data_epoch))
            self._prompt_orders = {data_epoch: order}
        return self.prompts[int(self._prompt_orders[data_epoch][position])]

    # ---------------------------------------------------------------------------------------- helpers

    def mean(self, values: torch.Tensor) -> float:
        """Mean over every element on every process."""
        total = self.world.all_sum(torch.stack([values.float().sum(), torch.tensor(float(values.numel()),
                                                                                  device=values.device)]))
        return float(total[0] / total[1].clamp(min=1))

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor) -> float:
        return float(masked_mean(values.float(), mask, reduce=self.world.all_sum))

    def raise_if_stopped(self) -> None:
        """Stop between phases of a step when no weight has changed yet (all processes agree)."""
        if self.world.any(self.stop_requested):
            raise Stopped(f"stopped during step {self.step + 1}, before its update")

    # ------------------------------------------------------------------------------------ checkpoints

    def save_state(self, directory: Path) -> None:
        """Write what continuing exactly needs: weights (or adapters), optimizers, LR schedules, beta, guardrail
        history, RNG states, step (the data position follows from it) and the metrics so far."""
        directory.mkdir(parents=True, exist_ok=True)
        self.policy.save(directory, "policy")
        self.value.save(directory, "value")
        torch.save(seeding.rng_state(), directory / f"rng-rank{self.world.rank}.pt")
        if self.world.is_main:
            state = {"step": self.step, "kl_controller": self.kl_ctl.state_dict(),
                     "guardrails": self.guardrails.state_dict(), "sizes": dataclasses.asdict(self.sizes)}
            (directory / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
            (directory / METRICS).write_text("".join(json.dumps(m) + "\n" for m in self.history))

    def load_state(self, directory: Path) -> None:
        state = json.loads((directory / TRAINER_STATE).read_text())
        if state["sizes"] != dataclasses.asdict(self.sizes):
            raise ConfigError(f"the checkpoint in {directory} was made with other batch sizes: {state['sizes']}")
        self.policy.load(directory, "policy")
        self.value.load(directory, "value")
        rng = directory / f"rng-rank{self.world.rank}.pt"
        if rng.exists():
            seeding.set_rng_state(torch.load(rng, weights_only=True))
        self.step = state["step"]
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.guardrails.load_state_dict(state["guardrails"])
        self.history = [json.loads(line) for line in (directory / METRICS).read_text().splitlines() if line]
        self.log.rewrite(self.history)


def _fields(rollout: Rollout) -> dict[str, torch.Tensor]:
    return {f.name: getattr(rollout, f.name) for f in dataclasses.fields(rollout)}
