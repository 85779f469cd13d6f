"""Errors a stage raises on purpose; the CLI turns each into its exit code."""

from __future__ import annotations


class ConfigError(Exception):
    """The stage config, the spec or an input is wrong; the message names the field and the fix."""


class Preempted(Exception):
    """Training stopped on SIGTERM after saving a checkpoint; the attempt should be retried."""
