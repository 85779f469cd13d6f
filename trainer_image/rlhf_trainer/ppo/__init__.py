"""The PPO engine of the ``ppo`` stage: the four-model RLHF loop on torch, transformers, peft and DeepSpeed.

Read in this order:

* ``trainer.py``: the loop, one numbered step after another (rollout, evaluate, rewards, advantages, PPO
  epochs, KL control and logging, checkpoint).
* ``functional.py``: the math as pure tensor functions (masked whitening, KL estimators, stop-token truncation,
  missing-EOS penalty, reward placement, GAE, clipped losses), each tested against hand-computed values.
* ``experience.py``: what one step carries from the rollout to the update, with tensor shapes.
* ``rollout.py``: one seeded generator per episode (the decoding loop is ``rlhf_trainer.generation``).
* ``models.py``: loading policy, reference, value and reward models; what LoRA shares; the values of a batch.
  (Log-probabilities of a batch are ``rlhf_trainer.modeling``'s, shared with the evaluate stage.)
* ``kl_control.py``, ``guardrails.py``, ``metrics_log.py``: beta, warning flags, per-step metrics.
* ``learner.py``, ``distributed.py``, ``checkpoint.py``: optimizers (plain or DeepSpeed ZeRO), processes,
  checkpoints in the store. Reproducible randomness is ``rlhf_trainer.seeding`` (shared with the sampling stages).
"""
