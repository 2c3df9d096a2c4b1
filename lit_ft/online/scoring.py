"""Scalar rewards: where a sequence scorer's score is read (the reward module trains with these functions and the
online stages score rollouts with them, so both read the reward at exactly the same token), a one-call loader of a
reward export (`lit_ft.models.adapters` owns the format), and the user's reward or metric callables by name.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_ft.errors import loading
from lit_ft.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_NAME, head_keys, read_normalization
from lit_ft.models import families, shared_prompt
from lit_ft.models.card import local_base
from lit_ft.models.load import load_base
from lit_ft.models.spec import ModelSpec


def resolve_callable(path: str):
    """Import `package.module.function` (used for metrics and rewards named in a config)."""
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"'{path}' is not a dotted path like package.module.function")
    return getattr(importlib.import_module(module), name)


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
    return head_scores(hidden[torch.arange(hidden.shape[0], device=hidden.device), idx], head)


def packed_last_index(sequence_ids: Tensor, n: int) -> Tensor:
    """Flat index into the ``R * L`` tokens of packed rows of the last token of each of the ``n`` sequences.

    Args:
        sequence_ids: ``[R, L]`` which sequence (0..n-1) each token belongs to, -1 on the padding tail
            (`lit_ft.data.collate.PackedPreferenceCollator`).
        n: the number of sequences (every one holds at least one token).

    Returns:
        ``[n]`` long, in sequence order. Found on the device (no host synchronisation).
    """
    flat = sequence_ids.reshape(-1)
    owner = torch.where(flat >= 0, flat, n)  # the padding tail goes to one extra slot, dropped below
    at = torch.arange(flat.numel(), device=flat.device)
    return torch.zeros(n + 1, dtype=torch.long, device=flat.device).scatter_reduce(0, owner, at, "amax")[:n]


def head_scores(pooled: Tensor, head: nn.Module) -> Tensor:
    """``[N]`` fp32 scores of pooled hidden states ``[N, H]`` under a 1-output head (PEFT's wrapper: the active
    adapter's trained copy), in the head's dtype (a trained head is float32, `lit_ft.models.build.fp32_head`)."""
    copies = getattr(head, "modules_to_save", None)  # PEFT's wrapper: the active adapter's copy computes
    use_copy = copies is not None and not head.disable_adapters and head.active_adapters[0] in copies
    active = copies[head.active_adapters[0]] if use_copy else head
    dtype = next(active.parameters()).dtype
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


def packed_sequence_scores(model, input_ids: Tensor, position_ids: Tensor, sequence_ids: Tensor, n: int) -> Tensor:
    """Raw ``[n]`` fp32 rewards of ``n`` sequences packed padding-free into rows (``[R, L]`` ids with restarting
    ``position_ids`` and the ``sequence_ids`` of `lit_ft.data.collate.PackedPreferenceCollator`), in sequence order:
    the score read at each sequence's last token, as `sequence_scores` reads it on padded rows. No attention mask:
    transformers builds the block-diagonal causal mask from the restarting positions (`families.check_packing`
    probes that the model's attention does)."""
    families.check_packing(model)
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    return head_scores(hidden.reshape(-1, hidden.shape[-1]).index_select(0, packed_last_index(sequence_ids, n)), head)


def shared_prompt_scores(model, batch: dict) -> Tensor:
    """Raw ``[2B]`` fp32 rewards of a shared-prompt batch (`lit_ft.data.collate.SharedPromptCollator`: each pair one
    row, its prompt once), chosen then rejected: the score read at each response's last token (``last_index``), which
    attends to its prompt and itself only (`lit_ft.models.shared_prompt`)."""
    decoder, head = decoder_and_head(model)
    ids, mask, positions = shared_prompt.decoder_inputs(model, batch)
    hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    return head_scores(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch["last_index"]), head)


# ---------------------------------------------------------------------------------------------- scorer


class RewardScorer:
    """A trained reward model, ready to score texts or token rows (normalized when the export says so)."""

    def __init__(self, model, tokenizer=None, gain: float = 1.0, bias: float = 0.0, max_length: int | None = None):
        """
        Args:
            model: an ``*ForSequenceClassification`` model, or a causal LM with lit_ft's ``score`` head
                (``lit_ft.models.families.add_score_head``), PEFT-wrapped or merged, with a 1-output ``score`` head.
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
    def from_pretrained(cls, adapter_dir: str | Path, base: ModelSpec | None = None, device="cpu",
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

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / ADAPTER_CONFIG).exists():
            raise FileNotFoundError(f"{adapter_dir} has no adapter_config.json: not a reward adapter directory")
        if not head_keys(adapter_dir):
            raise ValueError(f"{adapter_dir}/{ADAPTER_WEIGHTS} holds no '{HEAD_NAME}' head: it would score at random")
        if base is None:
            # float32 from the adapter's base (the bundled default's local cache for the default); a family without
            # a sequence classifier gets lit_ft's score head
            base = ModelSpec(name_or_path=local_base(adapter_dir), dtype="float32")
        model = load_base(base, task="score", device=torch.device(device))
        base_name = base.name_or_path
        with loading(adapter_dir, "reward adapter"):
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
