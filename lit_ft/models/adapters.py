"""An exported adapter directory, read and written in one place: its files, the score head and normalization of a
reward export, and the record of the base it was trained on. Roles (PPO/GRPO), the scorer, the model builder, chat
and export all read adapters through these functions.

Layout (PEFT's, plus two lit_ft files):

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA weights; a reward export also holds the scalar
  head under a key ending in ``score.weight`` (plus ``score.bias`` when the head has one);
- the tokenizer files;
- ``lit_ft_base.json``: the identity of the base it was trained on (`lit_ft.models.identity`);
- a reward export optionally has ``reward_normalization.json`` ``{"gain": g, "bias": b}``: normalized reward =
  g * raw + b.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_ft.errors import ConfigError
from lit_ft.models.default import DEFAULT_MODEL_NAME
from lit_ft.models.identity import describe_identity, identity_diff

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NORMALIZATION_FILE = "reward_normalization.json"
HEAD_NAME = "score"


# ---------------------------------------------------------------------------------------------- base identity

BASE_FILE = "lit_ft_base.json"  # in every exported adapter directory: the base it was trained on


def read_base_identity(adapter_dir) -> dict | None:
    f = Path(adapter_dir) / BASE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def trained_base(adapter_dir) -> str | None:
    """The `model.base.name_or_path` of the base an adapter was trained on (its `lit_ft_base.json`): None for the
    bundled default, or where the adapter does not say."""
    name = (read_base_identity(adapter_dir) or {}).get("name_or_path")
    return None if name in (None, DEFAULT_MODEL_NAME) else name


def write_base_identity(adapter_dir, identity: dict) -> None:
    """`lit_ft_base.json`: the base model an adapter directory was trained on."""
    (Path(adapter_dir) / BASE_FILE).write_text(json.dumps(identity, indent=2) + "\n")


def check_adapter_base(adapter_dir, identity: Mapping, setting: str) -> None:
    """Refuse an adapter exported from another base's weights. Only the weights are compared: the same weights
    under another path, or quantized differently (an adapter trained in bf16 applied to an NF4 base), are fine."""
    saved = read_base_identity(adapter_dir)
    if saved and identity_diff(saved, identity, keys=("weights",)):
        raise ConfigError(f"{setting}: {adapter_dir} was trained on other base weights than this run's "
                          f"(adapter: {describe_identity(saved)}; this run: {describe_identity(identity)})")


def check_adapter(path: str | Path, identity: Mapping, setting: str) -> Path:
    """An adapter directory a setting names: it must hold a PEFT adapter trained on this base."""
    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists():
        raise ConfigError(f"{setting}: {path} has no {ADAPTER_CONFIG}")
    check_adapter_base(path, identity, setting)
    return path


# ---------------------------------------------------------------------------------------------- reward export


def head_keys(adapter_dir: str | Path) -> list[str]:
    """Keys of ``adapter_model.safetensors`` that belong to the score head."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter_dir) / ADAPTER_WEIGHTS), framework="pt") as f:
        return [k for k in f.keys() if k.endswith(f"{HEAD_NAME}.weight") or k.endswith(f"{HEAD_NAME}.bias")]


def load_score_head(adapter_dir: str | Path) -> nn.Linear:
    """The scalar head stored with a reward adapter, as an ``nn.Linear(H, 1)``."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}: not a reward adapter directory")
    state = load_file(str(path))
    weight = [k for k in state if k.endswith(f"{HEAD_NAME}.weight")]
    if len(weight) != 1:
        raise ValueError(f"{path}: expected one key ending in '{HEAD_NAME}.weight', found {weight}: the head was not saved")
    w = state[weight[0]]
    bias_key = weight[0][: -len("weight")] + "bias"
    head = nn.Linear(w.shape[1], w.shape[0], bias=bias_key in state, dtype=w.dtype)
    with torch.no_grad():
        head.weight.copy_(w)
        if bias_key in state:
            head.bias.copy_(state[bias_key])
    return head


def read_normalization(directory: str | Path) -> tuple[float, float]:
    """(gain, bias) of ``reward_normalization.json``; (1, 0) when the file is absent."""
    path = Path(directory) / NORMALIZATION_FILE
    if not path.exists():
        return 1.0, 0.0
    data = json.loads(path.read_text())
    return float(data["gain"]), float(data["bias"])


def write_normalization(directory: str | Path, gain: float, bias: float) -> Path:
    """Write ``reward_normalization.json`` (normalized = gain * raw + bias)."""
    if not (math.isfinite(gain) and math.isfinite(bias)):
        raise ValueError(f"reward normalization must be finite, got gain={gain}, bias={bias}")
    path = Path(directory) / NORMALIZATION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gain": float(gain), "bias": float(bias)}, indent=2) + "\n")
    return path


def normalization_from_stats(mean: float, std: float, eps: float = 1e-6) -> tuple[float, float]:
    """(gain, bias) that map rewards of the given mean and std to mean 0, std 1."""
    gain = 1.0 / max(std, eps)
    return gain, -mean * gain


@dataclass
class RewardExport:
    """An exported reward adapter: LoRA config and weights, score head, normalization (normalized = gain*raw+bias)."""

    config: object
    lora_state: dict[str, Tensor]
    head_weight: Tensor
    head_bias: Tensor | None
    gain: float = 1.0
    bias: float = 0.0
    path: str | None = None


def read_reward_export(path: str | Path, identity: Mapping | None = None,
                       setting: str = "model.reward_adapter") -> RewardExport:
    """Read a reward directory (PEFT SEQ_CLS adapter + `score` head + optional `reward_normalization.json`),
    refusing one trained on other base weights than `identity`'s."""
    from peft import PeftConfig
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / ADAPTER_CONFIG).exists() or not (path / ADAPTER_WEIGHTS).exists():
        raise ConfigError(f"{setting}: {path} needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (a reward export)")
    if identity is not None:
        check_adapter_base(path, identity, setting)
    try:
        head = load_score_head(path)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{setting}: {e}") from e
    if head.out_features != 1:
        raise ConfigError(f"{setting}: the score head has {head.out_features} outputs, expected 1")
    state = load_file(str(path / ADAPTER_WEIGHTS))
    for key in head_keys(path):
        state.pop(key)
    config = copy.deepcopy(PeftConfig.from_pretrained(str(path)))
    # The LoRA weights go onto the causal LM's decoder (same module names as the *ForSequenceClassification
    # decoder); the head is ours, so PEFT must not look for a `score` module to wrap.
    config.task_type, config.modules_to_save = "CAUSAL_LM", None
    gain, bias = read_normalization(path)
    head_bias = head.bias.detach().float() if head.bias is not None else None
    return RewardExport(config, state, head.weight.detach().float(), head_bias, gain, bias, str(path))
