"""Shared pytest fixtures. Fixture modules live next to this file and are imported here."""

from s3_server import s3_env, s3_server  # noqa: F401  (fixtures: a real S3-compatible server on loopback)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random causal LM checkpoint (folder) with a ChatML tokenizer; built once per session."""
    from tiny_models import build_tiny_causal_lm

    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-model"))
