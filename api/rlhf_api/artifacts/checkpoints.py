"""A running stage's resume points in the store, and the pointer to the latest one.

    <output uri>/checkpoints/checkpoint-<step>/   one checkpoint, published with its own manifest
                                                  (a multi-process stage: one folder per process under it)
    <output uri>/checkpoints/latest.json          {"checkpoint", "global_step", "config_digest", "processes"}

The trainer publishes a checkpoint and then moves the pointer to it (:func:`advance`), which deletes the one it
named before; a new attempt of the stage resumes from what the pointer names when the config digest is its own
(:func:`read_pointer`). The operator shows the pointer's step as a running stage's progress when the stage
publishes none.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from rlhf_api.artifacts.store import NotFoundError, Store, UnsafePathError, join_uri

CHECKPOINTS = "checkpoints"
POINTER_NAME = "latest.json"
#: What a pointer's ``checkpoint`` may name: one folder directly under ``checkpoints/``, as :func:`checkpoint_name`
#: makes it (never a path: the trainer joins it onto its local folder and onto the store URI).
CHECKPOINT_NAME_PATTERN = re.compile(r"checkpoint-[0-9]{1,12}")


@dataclass(frozen=True)
class CheckpointPointer:
    checkpoint: str  # the folder under checkpoints/, e.g. checkpoint-40
    global_step: int
    config_digest: str  # the stage config the checkpoint was made with
    processes: int = 1  # how many processes wrote it (ZeRO shards cannot be read by another number)


def checkpoints_uri(output_uri: str) -> str:
    return join_uri(output_uri, CHECKPOINTS)


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def checkpoint_uri(output_uri: str, name: str, *parts: str) -> str:
    return join_uri(checkpoints_uri(output_uri), name, *parts)


def pointer_uri(output_uri: str) -> str:
    return join_uri(checkpoints_uri(output_uri), POINTER_NAME)


def read_pointer(output_uri: str, store: Store, config_digest: str | None = None) -> CheckpointPointer | None:
    """The pointer to the stage's latest checkpoint; None when there is none, or (given ``config_digest``) when it
    was made with another config.

    Raises:
        StoreError: the store could not be read.
        UnsafePathError: its ``checkpoint`` is not a checkpoint folder's name (``..``, a path, an absolute path):
            also a ``ValueError``.
        ValueError: the pointer is not valid JSON of this shape.
    """
    uri = pointer_uri(output_uri)
    try:
        doc = json.loads(store.read_bytes(uri))
    except NotFoundError:
        return None
    try:
        pointer = CheckpointPointer(checkpoint=str(doc["checkpoint"]), global_step=int(doc["global_step"]),
                                    config_digest=str(doc["config_digest"]), processes=int(doc.get("processes", 1)))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"malformed {POINTER_NAME}: {exc}") from exc
    if not CHECKPOINT_NAME_PATTERN.fullmatch(pointer.checkpoint):
        raise UnsafePathError(
            f"{uri}: refusing its checkpoint {pointer.checkpoint!r}: a pointer names one folder under "
            f"{CHECKPOINTS}/ (checkpoint-<step>), never a path; the pointer is corrupt or was written to escape "
            "the stage's folder: delete it (the stage then starts over)"
        )
    if config_digest is not None and pointer.config_digest != config_digest:
        return None
    return pointer


def advance(output_uri: str, store: Store, pointer: CheckpointPointer, *, keep_previous: bool = False) -> None:
    """Point ``latest.json`` at ``pointer.checkpoint`` (already published), then delete the checkpoint it named
    before unless ``keep_previous`` (``spec.storage.keepCheckpoints``): one resume point is enough."""
    try:
        previous = read_pointer(output_uri, store)
    except ValueError:
        previous = None
    store.write_bytes(pointer_uri(output_uri), json.dumps(asdict(pointer)).encode())
    if previous is not None and previous.checkpoint != pointer.checkpoint and not keep_previous:
        store.delete_prefix(checkpoint_uri(output_uri, previous.checkpoint))
