"""What ``bench/ppo_step.py`` and ``bench/trl_ppo_reference.py`` share, so that both measure the same configurations
on the same checkpoints, in processes started alike: the configurations, the cached pi_SFT and R_phi folders, the
measured processes' environment, and how a measuring child reports its figures."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

from rlhf_operator.malloc import LIBRARY, with_tcmalloc

CONFIGS = {
    "full-fp32": {"lora": False, "bf16": False},
    "lora-fp32": {"lora": True, "bf16": False},
    "full-bf16": {"lora": False, "bf16": True},
    "lora-bf16": {"lora": True, "bf16": True},
}
MODEL = "builtin://smollm2-135m-instruct"


def stage_checkpoints() -> tuple[Path, Path]:
    """pi_SFT and R_phi folders made from the demo model as the SFT and reward stages write theirs (once)."""
    import torch

    from rlhf_api.cache import cache_root
    from rlhf_api.spec import ModelSpec
    from rlhf_trainer import models as hf_models
    from rlhf_trainer.builtin_models import builtin_model_dir

    model_dir = builtin_model_dir(MODEL)
    root = cache_root() / "bench" / model_dir.name
    sft, rm = root / "sft", root / "rm"
    if not (root / ".complete").exists():
        spec = ModelSpec(uri=MODEL)
        tokenizer = hf_models.load_tokenizer(model_dir, spec)
        hf_models.save_plain(hf_models.load_causal_lm(model_dir, spec, tokenizer), tokenizer, sft)
        torch.manual_seed(0)  # the score head's initialisation
        hf_models.save_plain(hf_models.load_sequence_classifier(sft, spec, tokenizer), tokenizer, rm)
        (root / ".complete").touch()
    return sft, rm


def bench_environment(glibc: bool) -> dict[str, str]:
    """The measured processes' environment: offline, on tcmalloc as the trainer runs (glibc's malloc if asked)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if glibc:  # also where LD_PRELOAD already names it (the trainer image)
        env["LD_PRELOAD"] = " ".join(p for p in env.get("LD_PRELOAD", "").split() if LIBRARY not in p)
        return env
    return with_tcmalloc(env)


def child_result(proc: subprocess.CompletedProcess) -> dict | None:
    """The figures a measuring child process printed on its ``RESULT`` line, or None when it failed."""
    results = [line[len("RESULT "):] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(results[0]) if proc.returncode == 0 and results else None


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB (2**30 bytes; Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
