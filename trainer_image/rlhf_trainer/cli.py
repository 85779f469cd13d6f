"""``rlhf-train STAGE --config FILE``: the one entrypoint of the trainer image.

The local runner starts it as a subprocess and the operator as a Job's command. What it is given and what it
answers with (exit codes, environment, the termination message) is :mod:`rlhf_api.entrypoint`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlhf_api import entrypoint
from rlhf_api.artifacts import ChecksumError, StoreError, UnsafePathError, publish
from rlhf_api.entrypoint import EXIT_CONFIG_ERROR, EXIT_INTEGRITY_ERROR, EXIT_PREEMPTED
from rlhf_api.spec import Stage
from rlhf_api.stage_config import StageConfig
from rlhf_trainer.errors import ConfigError, Preempted

IMPLEMENTED = {Stage.SFT, Stage.PREFERENCES, Stage.REWARD, Stage.PPO, Stage.EVALUATE}


def load_config(path: str | None, stage: Stage) -> StageConfig:
    raw = Path(path).read_text() if path else os.environ.get(entrypoint.STAGE_CONFIG_ENV)
    if raw is None:
        raise ConfigError(f"no stage config: pass --config FILE or set {entrypoint.STAGE_CONFIG_ENV}")
    try:
        config = StageConfig.model_validate_json(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid stage config: {err}") from err
    if config.stage != stage:
        raise ConfigError(f"the config is for stage {config.stage.value}, not {stage.value}")
    return config


def run_stage(config: StageConfig, workspace: Path) -> dict[str, Any]:
    """Run one stage in ``workspace`` and publish its output with the manifest last. Returns the metrics."""
    from rlhf_trainer.accelerations.onednn_linear import onednn_linear, onednn_preferred
    from rlhf_trainer.models import set_deepspeed_accelerator
    from rlhf_trainer.workspace import Workspace

    set_deepspeed_accelerator()

    if config.stage not in IMPLEMENTED:
        raise ConfigError(
            f"stage {config.stage.value} is not available in this trainer version: disable it in the spec "
            f"(spec.{config.stage.value}.enabled: false) or give spec.{config.stage.value}.artifact"
        )
    ws = Workspace(config, workspace)
    module = importlib.import_module(f"rlhf_trainer.stages.{config.stage.value}")
    started = time.monotonic()
    with onednn_linear(onednn_preferred()):
        metrics = module.run(ws)
    metrics["seconds"] = round(time.monotonic() - started, 1)
    if os.environ.get("RANK", "0") != "0":  # another process of a distributed stage: the main one publishes
        return metrics
    (ws.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    result = publish(ws.output_dir, config.output_uri, ws.output_store, stage=config.stage.value,
                     config_digest=config.digest, metrics=metrics)
    print(f"published {len(result.uploaded)} file(s) to {config.output_uri} "
          f"({len(result.skipped)} unchanged)", file=sys.stderr)
    if not config.storage.keep_checkpoints:  # resume points of a finished stage: storage nobody needs
        removed = ws.output_store.delete_prefix(ws.checkpoints_uri)
        if removed:
            print(f"deleted {removed} checkpoint file(s) under {ws.checkpoints_uri} "
                  "(spec.storage.keepCheckpoints keeps them)", file=sys.stderr)
    return metrics


def write_termination_message(message: str) -> None:
    """The report for the pod's status (written only where a termination log exists, or one is named)."""
    named = os.environ.get(entrypoint.TERMINATION_LOG_ENV)
    path = Path(named or entrypoint.TERMINATION_LOG)
    if path.parent.is_dir() and (path.exists() or named):
        try:
            path.write_text(message)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    """``rlhf-train``; as the process's entry point (``argv`` None) it ends the process itself (:func:`leave`)."""
    code = run(argv)
    if argv is None:
        leave(code)
    return code


def leave(code: int) -> None:
    """End the process with ``code`` now if it joined a process group, without the interpreter's finalization: gloo's
    threads and DeepSpeed's objects torn down there have aborted finished processes ("terminate called without an
    active exception", exit -6) after their work was stored and reported."""
    if "deepspeed" in sys.modules or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=entrypoint.COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[s.value for s in Stage])
    parser.add_argument("--config", help=f"stage config JSON file (default: ${entrypoint.STAGE_CONFIG_ENV})")
    parser.add_argument("--workspace",
                        help=f"local working folder (default: ${entrypoint.WORKSPACE_ENV} or a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="validate the config, touch nothing, exit 0")
    args = parser.parse_args(argv)
    stage = Stage(args.stage)

    try:
        config = load_config(args.config, stage)
        if args.dry_run:
            print(json.dumps({"stage": stage.value, "dryRun": True, "output": config.output_uri}))
            return 0
        workspace = args.workspace or os.environ.get(entrypoint.WORKSPACE_ENV)
        if workspace:
            metrics = run_stage(config, Path(workspace))
        else:
            with tempfile.TemporaryDirectory(prefix=f"rlhf-{stage.value}-") as tmp:
                metrics = run_stage(config, Path(tmp))
    except ConfigError as err:
        print(f"rlhf-train {stage.value}: configuration error: {err}", file=sys.stderr)
        write_termination_message(entrypoint.termination_message(stage, error=str(err)))
        return EXIT_CONFIG_ERROR
    except (ChecksumError, UnsafePathError) as err:  # a retry reads the same bytes
        print(f"rlhf-train {stage.value}: corrupted input: {err}", file=sys.stderr)
        write_termination_message(entrypoint.termination_message(stage, error=str(err)))
        return EXIT_INTEGRITY_ERROR
    except StoreError as err:
        print(f"rlhf-train {stage.value}: storage error (will be retried): {err}", file=sys.stderr)
        write_termination_message(entrypoint.termination_message(stage, error=str(err)))
        return 1
    except Preempted as err:
        print(f"rlhf-train {stage.value}: {err}", file=sys.stderr)
        return EXIT_PREEMPTED

    print(json.dumps({"stage": stage.value, "metrics": metrics}))
    write_termination_message(entrypoint.termination_message(stage, metrics=metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
