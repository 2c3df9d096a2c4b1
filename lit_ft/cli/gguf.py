"""`lit-ft export gguf`: llama.cpp's own converters, run on a merged model or an adapter.

lit_ft does not write GGUF itself: llama.cpp's `convert_hf_to_gguf.py` (a whole model) and
`convert_lora_to_gguf.py` (a LoRA adapter, for `llama-cli --lora` and Ollama's `ADAPTER`) know every
architecture's tensor layout and are kept in step with the runtime that reads the files. They need the `gguf`
package and a llama.cpp checkout; without either the command says so and does nothing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lit_ft.errors import ConfigError

CONVERTERS = {"model": "convert_hf_to_gguf.py", "lora": "convert_lora_to_gguf.py"}


def find_converter(kind: str, llama_cpp: str | None = None) -> Path:
    """The llama.cpp script for `kind` ("model" or "lora"): in `llama_cpp`, else `$LLAMA_CPP_DIR`, else on PATH."""
    script = CONVERTERS[kind]
    folder = llama_cpp or os.environ.get("LLAMA_CPP_DIR")
    if folder:
        path = Path(folder).expanduser() / script
        if path.is_file():
            return path
        raise ConfigError(f"--llama_cpp: {folder} has no {script} (a llama.cpp checkout has it at its top level)")
    found = shutil.which(script)
    if found:
        return Path(found)
    raise ConfigError(f"export gguf needs llama.cpp's {script}: clone https://github.com/ggml-org/llama.cpp and pass "
                      "--llama_cpp DIR (or set LLAMA_CPP_DIR)")


def to_gguf(src: str | os.PathLike, out: str | os.PathLike, llama_cpp: str | None = None,
            outtype: str = "f16", overwrite: bool = False) -> Path:
    """Convert `src` (a merged model directory, or a PEFT adapter directory) into the GGUF file `out`."""
    from lit_ft.train.outputs import check_output

    src, out = Path(src), Path(out)
    check_output(out, "--out", inputs=(src,), overwrite=overwrite, kind="file")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("export gguf needs the gguf package: `pip install gguf`")
    if (src / "adapter_config.json").exists():
        from lit_ft.models.card import local_base

        command = [str(find_converter("lora", llama_cpp)), "--base", local_base(src), str(src)]
    elif (src / "config.json").exists():
        command = [str(find_converter("model", llama_cpp)), str(src)]
    else:
        raise ConfigError(f"--src: {src} is neither a model directory (config.json) nor an adapter "
                          "(adapter_config.json); `lit-ft export merge` writes a model directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, *command, "--outfile", str(out), "--outtype", outtype]
    result = subprocess.run(command)
    if result.returncode != 0 or not out.is_file():
        raise ConfigError(f"llama.cpp's converter failed (exit code {result.returncode}): {' '.join(command)}")
    return out
