"""Shared pytest fixtures. Fixture modules live next to this file and are imported here."""

import os  # noqa: E402

import pytest  # noqa: E402
from s3_server import moto_s3_server, s3_env, s3_server  # noqa: F401  (fixtures: a real S3-compatible server on loopback)

# Unset bf16 fields mean bfloat16 on some CPUs (models.cpu_prefers_bf16): the tests run float32 on every CPU (their
# tolerances are float32's), here and in the stage processes and pods they start, which inherit the variable.
os.environ["RLHF_CPU_BF16"] = "0"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random causal LM checkpoint (folder) with a ChatML tokenizer; built once per session."""
    from tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ppo_inputs(tiny_model_dir, tmp_path_factory):
    """pi_SFT and R_phi folders as the earlier stages write them (pad token added, plain checkpoints), with the base
    model's spec; built once per session for the PPO tests, which only read them."""
    import torch

    from rlhf_api.spec import ModelSpec
    from rlhf_trainer import models as hf_models

    root = tmp_path_factory.mktemp("ppo-inputs")
    spec = ModelSpec(uri=tiny_model_dir.as_uri())
    torch.manual_seed(0)
    tokenizer = hf_models.load_tokenizer(tiny_model_dir, spec)
    hf_models.save_plain(hf_models.load_causal_lm(tiny_model_dir, spec, tokenizer), tokenizer, root / "sft")
    hf_models.save_plain(hf_models.load_sequence_classifier(root / "sft", spec, tokenizer), tokenizer, root / "rm")
    return root / "sft", root / "rm", spec


PROCESS_GROUP_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _process_group_environment_restored():
    """PPO's ``distributed.init`` exports RANK, WORLD_SIZE, LOCAL_RANK (and MASTER_*) for DeepSpeed, as a stage
    process should; in-process tests must not pass them on (accelerate then expects a process group)."""
    import os

    saved = {name: os.environ.get(name) for name in PROCESS_GROUP_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
