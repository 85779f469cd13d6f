"""A stage's local working area and its link to the artifact store.

Layout under the workspace root (a temp dir, or ``RLHF_WORKSPACE`` / ``--workspace``)::

    inputs/<role>/    inputs, downloaded and checked against their manifests
    output/           what the stage publishes (manifest.json is added last by the CLI)
    checkpoints/      in-stage checkpoints, mirrored to <output uri>/checkpoints/ for resumption
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_api.artifacts import (
    NotFoundError,
    Store,
    download_tree,
    fetch,
    open_store,
    read_manifest,
)
from rlhf_api.artifacts.checkpoints import checkpoints_uri
from rlhf_api.stage_config import InputRef, StageConfig, storage_options
from rlhf_trainer.errors import ConfigError


@dataclass
class Workspace:
    config: StageConfig
    root: Path
    _stores: dict[str, Store] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for sub in ("inputs", "output", "checkpoints"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def output_dir(self) -> Path:
        return self.root / "output"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def checkpoints_uri(self) -> str:
        return checkpoints_uri(self.config.output_uri)

    def store_for(self, uri: str) -> Store:
        """The store that holds ``uri`` (one client per scheme and bucket, reused)."""
        scheme = uri.split("://", 1)[0]
        if scheme not in self._stores:
            self._stores[scheme] = open_store(uri, storage_options(self.config.storage))
        return self._stores[scheme]

    @property
    def output_store(self) -> Store:
        return self.store_for(self.config.output_uri)

    def input_ref(self, role: str) -> InputRef:
        try:
            return self.config.inputs[role]
        except KeyError:
            raise ConfigError(
                f"stage {self.config.stage.value} needs input '{role}' but the stage config has "
                f"{sorted(self.config.inputs)}"
            ) from None

    def fetch_dir(self, role: str) -> Path:
        """Make the input ``role`` available as a local folder and return it.

        Stage outputs are read through their manifests (checksums verified). Inputs from outside the
        pipeline are a builtin model, or a folder in the store: read through its manifest when it has one,
        otherwise every file under the prefix.
        """
        ref = self.input_ref(role)
        if ref.uri.startswith("builtin://"):
            from rlhf_trainer.builtin_models import builtin_model_dir

            return builtin_model_dir(ref.uri)
        target = self.root / "inputs" / role
        store = self.store_for(ref.uri)
        if ref.produced_by is not None or read_manifest(ref.uri, store) is not None:
            try:
                fetch(ref.uri, target, store)
            except NotFoundError as err:
                producer = f"the {ref.produced_by.value} stage" if ref.produced_by else "the stage"
                raise ConfigError(
                    f"input '{role}' ({ref.uri}) has no manifest: {producer} that produces it has not finished ({err})"
                ) from err
            return target
        if not download_tree(ref.uri, target, store):  # every key checked: none lands outside target
            raise ConfigError(f"input '{role}': nothing found at {ref.uri}; check the URI in the spec")
        return target

    def fetch_file(self, uri: str) -> Path:
        """Download one file (a dataset) into inputs/files/ and return its path."""
        if uri.startswith("file://"):
            path = Path(uri[len("file://"):])
            if not path.is_file():
                raise ConfigError(f"dataset file {uri} does not exist")
            return path
        target = self.root / "inputs" / "files" / os.path.basename(uri.rstrip("/"))
        try:
            self.store_for(uri).download_file(uri, target)
        except NotFoundError as err:
            raise ConfigError(f"dataset {uri} does not exist in the store ({err})") from err
        return target
