"""Datasets: JSON Lines or Parquet rows from the store, or the builtin demo data.

``builtin://movie-reviews/sft`` names ``examples/data/movie-reviews/sft.jsonl``, shipped in the package as
``rlhf_trainer.builtin_data``. Rows are plain dicts; each stage checks the fields it needs with
:func:`require_fields`, so a wrong file fails with a message naming the dataset, the row and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from rlhf_api.spec import DatasetRef
from rlhf_trainer.errors import ConfigError
from rlhf_trainer.workspace import Workspace


def builtin_data_root() -> Any:
    """examples/data: packaged as rlhf_trainer.builtin_data in a wheel, read in place from a source checkout."""
    try:
        return resources.files("rlhf_trainer.builtin_data")
    except ModuleNotFoundError:  # editable install: the package-dir mapping of a subpackage is not importable
        return Path(__file__).resolve().parents[2] / "examples" / "data"


def builtin_dataset_path(uri: str) -> Path:
    name = uri.removeprefix("builtin://").strip("/")
    root = builtin_data_root()
    candidate = root.joinpath(*f"{name}.jsonl".split("/"))
    if not candidate.is_file():
        known = sorted(
            f"builtin://{d.name}/{f.name.removesuffix('.jsonl')}"
            for d in root.iterdir() if d.is_dir() for f in d.iterdir() if f.name.endswith(".jsonl")
        )
        raise ConfigError(f"unknown builtin dataset {uri!r}: known are {', '.join(known)}")
    return Path(str(candidate))


def read_rows(path: Path, fmt: str = "auto", source: str | None = None) -> list[dict[str, Any]]:
    """Rows of a JSON Lines or Parquet file."""
    source = source or str(path)
    if fmt == "auto":
        fmt = "parquet" if path.suffix == ".parquet" else "jsonl"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"dataset {source}: line {number} is not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ConfigError(f"dataset {source}: line {number} is not a JSON object")
            rows.append(row)
    return rows


def load_dataset_rows(ref: DatasetRef, ws: Workspace) -> list[dict[str, Any]]:
    path = builtin_dataset_path(ref.uri) if ref.uri.startswith("builtin://") else ws.fetch_file(ref.uri)
    rows = read_rows(path, ref.format, source=ref.uri)
    if not rows:
        raise ConfigError(f"dataset {ref.uri} is empty")
    return rows[: ref.limit] if ref.limit else rows


def load_prompts(ref: DatasetRef | None, ws: Workspace) -> list[str]:
    """The 'prompt' field of every row of a prompt set."""
    assert ref is not None  # the spec requires prompts whenever the stage runs
    rows = load_dataset_rows(ref, ws)
    require_fields(rows, ("prompt",), ref.uri)
    return [r["prompt"] for r in rows]


def require_fields(rows: Sequence[dict[str, Any]], fields: Iterable[str], source: str) -> None:
    fields = list(fields)
    for index, row in enumerate(rows):
        for name in fields:
            if not isinstance(row.get(name), str) or not row[name].strip():
                raise ConfigError(
                    f"dataset {source}: row {index + 1} has no text field '{name}' "
                    f"(this stage needs {', '.join(repr(f) for f in fields)})"
                )


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
