"""Stage manifests: a stage's output is complete if and only if its manifest exists and verifies.

A stage writes its files into a local directory and calls ``publish``, which uploads them to
``<storage root>/<namespace>/<pipeline>/<uid>/<stage>/`` and writes ``manifest.json`` there LAST,
listing every file with its size and sha256, the stage, the config digest, library versions and headline
metrics. A crash before that leaves no manifest, so the operator sees the stage as not done and reruns it.

The next stage calls ``fetch``, which downloads exactly the listed files and checks each one's size and
sha256; a mismatch raises ``ChecksumError`` and leaves no bad copy behind. Files in the stage directory
that the manifest does not list (leftovers of an earlier attempt) are never used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator

from rlhf_api.artifacts.checkpoints import CHECKPOINTS
from rlhf_api.artifacts.store import (
    TEMP_PREFIX,
    ChecksumError,
    NotFoundError,
    Store,
    StoreError,
    join_uri,
    sha256_file,
    temp_sibling,
)

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
DEFAULT_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "deepspeed", "rlhf-operator")

__all__ = [
    "DEFAULT_LIBRARIES",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "FileEntry",
    "InvalidManifestError",
    "Manifest",
    "PublishResult",
    "fetch",
    "is_complete",
    "library_versions",
    "manifest_uri",
    "publish",
    "read_manifest",
    "sha256_file",
]


class InvalidManifestError(StoreError):
    """A ``manifest.json`` exists but cannot be parsed, or was written by a newer format."""


class FileEntry(BaseModel):
    """One file of a stage's output."""

    path: str = Field(description="path: required. Relative to the stage directory, '/' separated, no '..'.")
    size: int = Field(ge=0, description="size: required. Bytes.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256: required. Hex digest of the content.")

    @field_validator("path")
    @classmethod
    def _relative_inside(cls, value: str) -> str:
        if "\\" in value or any(part in ("", ".", "..") for part in value.split("/")):
            raise ValueError(f"{value!r} must be a relative '/'-separated path inside the stage directory")
        return value


class Manifest(BaseModel):
    """The ``manifest.json`` of one stage's output directory."""

    format_version: int = Field(default=FORMAT_VERSION, description="format_version: optional. Manifest schema.")
    stage: str = Field(description="stage: required. The stage that produced the files (sft, reward...).")
    config_digest: str = Field(
        description="config_digest: required. Digest of the stage's effective config; a different digest means "
        "the output is stale."
    )
    created_at: str = Field(description="created_at: required. UTC ISO 8601 time the manifest was written.")
    files: list[FileEntry] = Field(description="files: required. Every file of the output, sorted by path.")
    library_versions: dict[str, str] = Field(
        default_factory=dict, description="library_versions: optional. Distribution name to version."
    )
    metrics: dict[str, float | int | str | None] = Field(
        default_factory=dict,
        description="metrics: optional. Headline metrics (final loss, reward accuracy...); NaN/inf become null.",
    )

    def entry(self, path: str) -> FileEntry | None:
        """The entry for ``path``, or ``None``."""
        return next((f for f in self.files if f.path == path), None)


@dataclass
class PublishResult:
    """What ``publish`` did."""

    manifest: Manifest
    """The manifest it wrote."""
    uploaded: list[str] = field(default_factory=list)
    """Relative paths it uploaded."""
    skipped: list[str] = field(default_factory=list)
    """Relative paths whose remote copy already had the same sha256."""


def library_versions(names: tuple[str, ...] = DEFAULT_LIBRARIES) -> dict[str, str]:
    """Installed versions of ``names`` (distribution names); ones not installed are left out."""
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def manifest_uri(uri: str) -> str:
    """The manifest's URI for a stage directory URI (a URI already ending in ``manifest.json`` is kept)."""
    return uri if uri.rstrip("/").endswith("/" + MANIFEST_NAME) else join_uri(uri, MANIFEST_NAME)


def _stage_dir(uri: str) -> str:
    stripped = uri.rstrip("/")
    return stripped[: -len(MANIFEST_NAME) - 1] if stripped.endswith("/" + MANIFEST_NAME) else stripped


def _local_files(local_dir: Path, exclude_dirs: tuple[str, ...]) -> list[tuple[str, Path]]:
    """``(relative posix path, path)`` of every file to publish, sorted by relative path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(local_dir):
        here = Path(dirpath)
        if here == local_dir:
            dirnames[:] = [d for d in dirnames if d not in exclude_dirs]
        for name in filenames:
            if name.startswith(TEMP_PREFIX) or (here == local_dir and name == MANIFEST_NAME):
                continue
            path = here / name
            files.append((path.relative_to(local_dir).as_posix(), path))
    return sorted(files)


def publish(
    local_dir: Path,
    out_uri: str,
    store: Store,
    *,
    stage: str,
    config_digest: str,
    metrics: Mapping[str, float | int | str | None] | None = None,
    exclude_dirs: tuple[str, ...] = (CHECKPOINTS,),
) -> PublishResult:
    """Upload a stage's output directory to ``out_uri`` and write its manifest last.

    Uploads every file under ``local_dir`` except the top-level directories in ``exclude_dirs``
    (in-stage checkpoints have their own pointer) and a stale top-level ``manifest.json``. A file whose
    remote copy already has the same size and sha256 is skipped, so re-publishing after a retry only
    moves what changed. If anything is to be uploaded, an existing manifest at ``out_uri`` is deleted
    first, so the directory never looks complete while it holds a mix of old and new files. The new
    manifest is written only after every upload succeeded; any failure raises and leaves no manifest.
    ``local_dir`` must not change while this runs. Remote files the manifest does not list are left
    in place; nothing ever reads them.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StoreError(f"cannot publish {local_dir} to {out_uri}: it is not a directory")
    target_manifest = manifest_uri(out_uri)
    remote_sizes = {info.uri: info.size for info in store.list(out_uri)}

    entries: list[FileEntry] = []
    to_upload: list[tuple[str, Path, str]] = []
    skipped: list[str] = []
    for rel, path in _local_files(local_dir, exclude_dirs):
        size, sha = path.stat().st_size, sha256_file(path)
        entries.append(FileEntry(path=rel, size=size, sha256=sha))
        uri = join_uri(out_uri, rel)
        if remote_sizes.get(uri) == size and store.sha256(uri) == sha:
            skipped.append(rel)
        else:
            to_upload.append((rel, path, sha))

    if to_upload and target_manifest in remote_sizes:
        store.delete(target_manifest)  # the directory is about to change: it is no longer complete
    for rel, path, sha in to_upload:
        store.upload_file(path, join_uri(out_uri, rel), sha)

    manifest = Manifest(
        stage=stage,
        config_digest=config_digest,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        files=entries,
        library_versions=library_versions(),
        metrics=dict(metrics or {}),
    )
    store.write_bytes(target_manifest, manifest.model_dump_json(indent=2).encode() + b"\n")
    return PublishResult(manifest=manifest, uploaded=[rel for rel, _, _ in to_upload], skipped=skipped)


def read_manifest(uri: str, store: Store) -> Manifest | None:
    """The manifest of the stage directory ``uri``; ``None`` when there is none.

    Raises ``InvalidManifestError`` (a ``StoreError``) naming the URI when it exists but cannot be parsed.
    """
    target = manifest_uri(uri)
    try:
        raw = store.read_bytes(target)
    except NotFoundError:
        return None
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise InvalidManifestError(
            f"{target} is not a valid manifest ({exc.error_count()} error(s), first at {where}: {first['msg']}); "
            "delete it and re-run the stage that produces it"
        ) from None
    if manifest.format_version > FORMAT_VERSION:
        raise InvalidManifestError(
            f"{target} has format_version {manifest.format_version}, newer than this rlhf-operator reads "
            f"({FORMAT_VERSION}); upgrade rlhf-operator"
        )
    return manifest


def is_complete(uri: str, store: Store, config_digest: str | None = None) -> bool:
    """Whether the stage directory ``uri`` holds a finished output.

    True when its manifest exists and parses, every listed file exists with the listed size and, if
    ``config_digest`` is given, the manifest's digest equals it. Contents are not hashed here (``fetch``
    does that); an unparsable manifest counts as incomplete.
    """
    try:
        manifest = read_manifest(uri, store)
    except InvalidManifestError:
        return False
    if manifest is None or (config_digest is not None and manifest.config_digest != config_digest):
        return False
    base = _stage_dir(uri)
    remote_sizes = {info.uri: info.size for info in store.list(base)}
    return all(remote_sizes.get(join_uri(base, f.path)) == f.size for f in manifest.files)


def _matches(path: Path, entry: FileEntry) -> bool:
    return path.is_file() and path.stat().st_size == entry.size and sha256_file(path) == entry.sha256


def fetch(uri: str, local_dir: Path, store: Store) -> Manifest:
    """Download the stage output at ``uri`` into ``local_dir``, verified, and return its manifest.

    Only the files the manifest lists are downloaded; one already in ``local_dir`` with the right sha256
    is kept. Each download lands in a temporary file that is renamed into place only after its size and
    sha256 match, so a listed path in ``local_dir`` holds verified content or nothing.

    Raises ``NotFoundError`` when there is no manifest and ``ChecksumError`` naming the file on a mismatch.
    """
    manifest = read_manifest(uri, store)
    base = _stage_dir(uri)
    if manifest is None:
        raise NotFoundError(
            f"no manifest at {manifest_uri(uri)}: the stage that produces it has not finished "
            "(or wrote somewhere else); run it first"
        )
    local_dir = Path(local_dir)
    for entry in manifest.files:
        target = local_dir.joinpath(*entry.path.split("/"))
        if _matches(target, entry):
            continue
        source = join_uri(base, entry.path)
        tmp = temp_sibling(target)
        try:
            store.download_file(source, tmp)
            size = tmp.stat().st_size
            if size != entry.size:
                raise ChecksumError(
                    f"{entry.path}: {source} has {size} bytes but {manifest_uri(uri)} lists {entry.size}; the "
                    "stored copy is corrupt or was overwritten: re-run the stage that produces it"
                )
            actual = sha256_file(tmp)
            if actual != entry.sha256:
                raise ChecksumError(
                    f"{entry.path}: {source} has sha256 {actual} but {manifest_uri(uri)} lists {entry.sha256} "
                    "(expected); the stored copy is corrupt or was overwritten: re-run the stage that produces it"
                )
            os.replace(tmp, target)
        except ChecksumError:
            target.unlink(missing_ok=True)  # a stale local copy with the wrong content is no copy either
            raise
        finally:
            tmp.unlink(missing_ok=True)
    return manifest
