"""Scalar rewards from a sequence scorer: where the score is read, the export format, and a one-call loader.

A leaf module (torch, transformers, peft, safetensors): the reward module trains with these functions and the
PPO module scores rollouts with them, so both read the reward at exactly the same token.

Export format of a reward model (a directory):

- ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT): the LoRA weights and the scalar head under a
  key ending in ``score.weight`` (plus ``score.bias`` when the head has one);
- the tokenizer files;
- optionally ``reward_normalization.json`` ``{"gain": g, "bias": b}``: normalized reward = g * raw + b.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # only a type: importing lit_ft.models at run time happens lazily, when a spec is given
    from lit_ft.models import ModelSpec

ADAPTER_WEIGHTS = "adapter_model.safetensors"
NORMALIZATION_FILE = "reward_normalization.json"
HEAD_NAME = "score"


# ---------------------------------------------------------------------------------------------- pooling


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row, for right or left padding.

    The mask, not the pad id, decides: with pad == EOS (SmolLM2, Llama 3) a search for the first pad id would
    stop before the EOS that closes the response.

    Args:
        attention_mask: ``[B, T]`` 1 on real tokens, 0 on padding.

    Returns:
        ``[B]`` long: the largest position whose mask is 1 (0 for an all-padding row).
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def scores_from_hidden(hidden: Tensor, attention_mask: Tensor, head: nn.Module) -> Tensor:
    """Scalar score of each row: the head applied to the hidden state of its last real token.

    Args:
        hidden: ``[B, T, H]`` final hidden states (after the final norm).
        attention_mask: ``[B, T]``.
        head: a 1-output linear layer (``nn.Linear(H, 1)`` or PEFT's wrapper of one).

    Returns:
        ``[B]`` fp32 scores. Only ``B`` rows go through the head, never ``B * T``.
    """
    idx = last_token_index(attention_mask)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # [B, H]
    dtype = next(head.parameters()).dtype
    return head(pooled.to(dtype)).squeeze(-1).float()


def decoder_and_head(model) -> tuple[nn.Module, nn.Module]:
    """(decoder returning hidden states, score head) of an ``*ForSequenceClassification`` model or a causal LM
    with a ``score`` head (families without a sequence classifier), PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(inner, inner.base_model_prefix)
    head = getattr(inner, HEAD_NAME, None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no '{HEAD_NAME}' head: expected an *ForSequenceClassification model")
    return decoder, head


def sequence_scores(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Raw ``[B]`` fp32 rewards of token rows (right- or left-padded) under a sequence scorer."""
    decoder, head = decoder_and_head(model)
    # Left padding needs positions that start at each row's first real token (right padding: a plain arange).
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    return scores_from_hidden(hidden, attention_mask, head)


# ---------------------------------------------------------------------------------------------- export format


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


# ---------------------------------------------------------------------------------------------- scorer


class RewardScorer:
    """A trained reward model, ready to score texts or token rows (normalized when the export says so)."""

    def __init__(self, model, tokenizer=None, gain: float = 1.0, bias: float = 0.0, max_length: int | None = None):
        """
        Args:
            model: an ``*ForSequenceClassification`` model, or a causal LM with lit_ft's ``score`` head
                (``lit_ft.families.add_score_head``), PEFT-wrapped or merged, with a 1-output ``score`` head.
            tokenizer: tokenizer for :meth:`score`; not needed for :meth:`score_ids`.
            gain: multiplier of the raw reward.
            bias: added after the gain.
            max_length: longest row :meth:`score` keeps (its LAST tokens, so the scored end survives).
        """
        self.model, self.tokenizer, self.gain, self.bias, self.max_length = model, tokenizer, gain, bias, max_length
        self.model.eval()
        if tokenizer is not None:
            tokenizer.truncation_side = "left"  # keep the end of each text, where the reward is read

    @classmethod
    def from_pretrained(cls, adapter_dir: str | Path, base: "ModelSpec | None" = None, device="cpu",
                        max_length: int | None = None) -> "RewardScorer":
        """Load an exported reward adapter (LoRA + head + tokenizer + normalization) in one call.

        Args:
            adapter_dir: the export directory.
            base: how to load the base (quantization, dtype, ...); None = float32 from the adapter config's
                ``base_model_name_or_path``.
            device: where the model runs.
            max_length: see ``__init__``.
        """
        from peft import PeftModel
        from transformers import AutoTokenizer

        from lit_ft.models import ModelSpec, load_base  # deferred: scoring stays importable without a model

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").exists():
            raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a reward adapter directory")
        if not head_keys(adapter_dir):
            raise ValueError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no '{HEAD_NAME}' head: it would score at random")
        if base is None:
            # float32 from the adapter's base (the bundled default's local cache for the default); a family without
            # a sequence classifier gets lit_ft's score head
            from lit_ft.model_card import local_base

            base = ModelSpec(name_or_path=local_base(adapter_dir), dtype="float32")
        model = load_base(base, task="score", device=torch.device(device))
        base_name = base.name_or_path
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        if base.quantization == "none":  # k-bit weights were placed on load and cannot move
            model.to(device)
        tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_name
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir)) if tok_dir is not None else None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        gain, bias = read_normalization(adapter_dir)
        return cls(model, tokenizer, gain, bias, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score_ids(self, input_ids: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
        """``[B]`` fp32 rewards of token rows (right- or left-padded), read at each row's last real token."""
        raw = sequence_scores(self.model, input_ids.to(self.device), attention_mask.to(self.device))
        return raw * self.gain + self.bias if normalize else raw

    @torch.no_grad()
    def score(self, texts: list[str], batch_size: int = 16, normalize: bool = True) -> Tensor:
        """``[N]`` fp32 rewards of fully rendered texts (prompt and response in the training template).

        Texts are tokenized without added special tokens, as the data modules do: the template carries them.
        """
        if self.tokenizer is None:
            raise ValueError("RewardScorer.score needs a tokenizer; use score_ids for token rows")
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="right",
                                 add_special_tokens=False, truncation=self.max_length is not None,
                                 max_length=self.max_length)
            out.append(self.score_ids(enc["input_ids"], enc["attention_mask"], normalize).cpu())
        return torch.cat(out) if out else torch.zeros(0)
