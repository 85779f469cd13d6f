"""Shared pytest fixtures. Fixture modules live next to this file and are imported here."""

from s3_server import s3_env, s3_server  # noqa: F401  (fixtures: a real S3-compatible server on loopback)
