"""Registers the cluster fixtures and hooks (fixtures.py) for the tests in this folder."""

from .fixtures import *  # noqa: F401,F403  (the fixtures and the hooks)
