"""The code's shape, checked where a reviewer would otherwise have to remember it.

* Layers: the trainer and the executors both stand on ``rlhf_api`` and never on each other; ``rlhf_api`` stands on
  neither. The PPO engine (``rlhf_trainer/ppo``) is used only by the PPO stage: what other stages share lives below.
* Functions read in one screen: at most 60 lines.
* Code says why; figures from particular machines live in docs/measurements.md, not in docstrings or comments.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"rlhf_api": ROOT / "api" / "rlhf_api", "rlhf_operator": ROOT / "operator" / "rlhf_operator",
            "rlhf_trainer": ROOT / "trainer_image" / "rlhf_trainer"}
MAY_IMPORT = {"rlhf_api": set(), "rlhf_operator": {"rlhf_api"}, "rlhf_trainer": {"rlhf_api"}}
MAX_FUNCTION_LINES = 60
# a duration or a speed quoted as a measurement: "2.08 s", "82 ms", "198 GFLOP/s", "19.6 min"
TIMING = re.compile(r"\b\d+(\.\d+)?\s?(s|ms|us|µs|min|GFLOP/s)\b")


def sources(package: str) -> list[Path]:
    return sorted(PACKAGES[package].rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_each_package_imports_only_the_layers_below_it(package):
    ours = set(PACKAGES)
    wrong = {f"{path.relative_to(ROOT)}: {name}" for path in sources(package) for name in imported_modules(path)
             if name.split(".")[0] in ours - {package} - MAY_IMPORT[package]}
    assert not wrong, sorted(wrong)


def test_only_the_ppo_stage_uses_the_ppo_engine():
    engine = PACKAGES["rlhf_trainer"] / "ppo"
    allowed = {engine, PACKAGES["rlhf_trainer"] / "stages" / "ppo.py"}
    wrong = {f"{path.relative_to(ROOT)}: {name}" for path in sources("rlhf_trainer")
             if engine not in path.parents and path not in allowed
             for name in imported_modules(path) if name.startswith("rlhf_trainer.ppo")}
    assert not wrong, sorted(wrong)


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for package in PACKAGES for path in sources(package)
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def prose(path: Path) -> list[tuple[int, str]]:
    """The module's docstrings and comments, with their line numbers."""
    text = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(text).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((getattr(node, "lineno", 1), doc))
    return found


def test_no_docstring_or_comment_quotes_a_timing():
    quoted = [f"{path.relative_to(ROOT)}:{line}: {match.group(0)}"
              for package in PACKAGES for path in sources(package)
              for line, text in prose(path) for match in TIMING.finditer(text)]
    assert not quoted, quoted


def test_the_example_pipelines_comments_quote_no_timing():
    quoted = [f"{path.name}:{number}: {line.strip()}" for path in sorted((ROOT / "examples").glob("*.yaml"))
              for number, line in enumerate(path.read_text().splitlines(), 1)
              if "#" in line and TIMING.search(line.split("#", 1)[1])]
    assert not quoted, quoted
