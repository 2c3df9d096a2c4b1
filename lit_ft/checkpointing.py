"""Slim, self-describing Lightning checkpoints: trainable state only, plus the identity of the frozen base."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch

from lit_ft.errors import ConfigError
from lit_ft.models import trainable_state_dict
from lit_ft.strategies import FSDP_INFIX

IDENTITY_KEY = "lit_ft_base"
MODULE_KEY = "lit_ft_module"
BASE_FILE = "lit_ft_base.json"


def slim(module: torch.nn.Module, checkpoint: dict, identity: dict) -> None:
    """Keep only trainable tensors in `checkpoint["state_dict"]` and record which base they belong to.

    Call from `on_save_checkpoint`. The frozen base is never written: a LoRA checkpoint is a small fraction
    of the base model's size.
    """
    state = checkpoint.get("state_dict")
    if state is None:
        checkpoint["state_dict"] = trainable_state_dict(module)
    else:
        # Filter what the strategy gathered (FSDP: the full, unsharded tensors) rather than reading parameters,
        # which under FSDP are local shards with wrapper prefixes in their names.
        names = {_unwrapped(n) for n, p in module.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in names}
    checkpoint[IDENTITY_KEY] = identity
    checkpoint[MODULE_KEY] = f"{type(module).__module__}.{type(module).__qualname__}"
    # Hyper-parameters as plain dicts, so the checkpoint loads with torch.load(weights_only=True).
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None:
        checkpoint["hyper_parameters"] = {k: _plain(v) for k, v in hparams.items()}


def _unwrapped(name: str) -> str:
    """A parameter name without the FSDP / activation-checkpointing wrapper prefixes."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def as_spec(cls, value):
    """Accept a dataclass instance or its plain-dict form (as stored in a checkpoint); None stays None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in value:
                v = value[f.name]
                inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                kwargs[f.name] = as_spec(type(inner), v) if dataclasses.is_dataclass(inner) else v
        return cls(**kwargs)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


def check_identity(checkpoint: dict, identity: dict) -> None:
    """Refuse to load adapters onto a different base. Call from `on_load_checkpoint`."""
    saved = checkpoint.get(IDENTITY_KEY)
    if saved is None:
        return
    diff = {k: (saved.get(k), identity.get(k)) for k in identity if saved.get(k) != identity.get(k)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the checkpoint was trained on another base model ({lines}); set model.base to match or start a new run"
        )


def save_adapter(model, path, tokenizer=None, identity: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a PEFT adapter directory (what `PeftModel.from_pretrained` and serving stacks load unchanged),
    with the tokenizer files and `lit_ft_base.json` naming the base it was trained on. `state_dict`: the model's
    full state where its own `state_dict()` holds shards (FSDP: `strategies.gathered_model_state`)."""
    path = Path(path)
    if state_dict is None:
        model.save_pretrained(path)
    else:
        _save_gathered_adapter(model, path, state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if identity is not None:
        write_base_identity(path, identity)
    return path


def _save_gathered_adapter(model, path: Path, state_dict: dict) -> None:
    """PEFT's adapter files from a gathered FSDP state. PEFT selects adapter tensors by the model's module names,
    which hold FSDP's infix at every wrapped decoder layer (PEFT strips it only at the root), so `state_dict` is keyed
    by those names and the infix leaves the written keys here, giving the plain names `PeftModel` loads."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, state_dict=state_dict)
    weights = {k.replace(FSDP_INFIX, ""): v.detach().cpu().contiguous() for k, v in weights.items()}
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = copy.copy(model.peft_config["default"])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(path))


def write_base_identity(adapter_dir, identity: dict) -> None:
    """`lit_ft_base.json`: the base model an adapter directory was trained on."""
    (Path(adapter_dir) / BASE_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def read_base_identity(adapter_dir) -> dict | None:
    f = Path(adapter_dir) / BASE_FILE
    return json.loads(f.read_text()) if f.exists() else None
