"""The parts of the rollout decode engine (`lit_ft.online.engine`) around its loop: the grouped decode attention, the
merged policy weights, the top-k/top-p filter, and which models the engine can serve."""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch
from torch import Tensor

log = logging.getLogger("lit_ft.online.engine")

GROUPED_SDPA = "lit_ft_grouped_sdpa"  # the attention implementation the engine switches sdpa models to


def grouped_decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             **kwargs):
    """transformers' attention-function signature. One query token ([B, H, 1, D]) against a grouped-query cache
    ([B, Hkv, L, D]): the g = H / Hkv query heads of each KV head become g query rows of one SDPA call over that
    head (query head h reads KV head h // g, as `repeat_kv` lays them out), so the cache is never expanded.
    Any other call (the prefill, ungrouped heads) goes to transformers' own sdpa function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    B, H, q, D = query.shape
    groups = H // key.shape[1]
    if q != 1 or groups == 1 or dropout:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                               dropout=dropout, **kwargs)
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(B, key.shape[1], groups, D), key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def register_grouped_attention() -> None:
    """Register the decode attention (and sdpa's mask builder under its name, so a forward that builds its own mask
    while it is switched on still gets the right one)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(GROUPED_SDPA, grouped_decode_attention)
    AttentionMaskInterface.register(GROUPED_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def engine_unsupported(model) -> str | None:
    """Why the engine cannot serve `model` (None when it can): attention kinds its 4D mask does not fit."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config(decoder=True) if hasattr(base.config, "get_text_config") else base.config
    impl = getattr(base.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the engine builds sdpa/eager masks)"
    layer_types = getattr(cfg, "layer_types", None) or []
    if getattr(cfg, "sliding_window", None) or any(t != "full_attention" for t in layer_types):
        return "sliding-window or non-full attention layers"
    if getattr(cfg, "is_encoder_decoder", False):
        return "encoder-decoder model"
    params = inspect.signature(type(base).forward).parameters
    if "logits_to_keep" not in params or not ({"cache", "past_key_values"} & set(params)):
        return f"{type(base).__name__}.forward takes no logits_to_keep or cache argument"
    return None


def lora_layers(model, adapter: str):
    """(name under the base model, module) of every PEFT LoRA layer holding `adapter`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return [(n, m) for n, m in base.named_modules() if adapter in getattr(m, "lora_A", {})]


class MergedWeights:
    """The policy LoRA merged into a rollout copy of the LoRA-wrapped base weights (W + scale * B @ A).

    Memory: one extra copy of every LoRA-wrapped weight, in the base's dtype (`nbytes`, logged). Quantized bases are
    refused: their weights are not plain tensors to add a delta to.
    """

    @staticmethod
    def bytes_needed(model, adapter: str) -> int:
        """What the copy would take (without allocating it)."""
        return sum(m.base_layer.weight.numel() * m.base_layer.weight.element_size()
                   for _, m in lora_layers(model, adapter))

    @staticmethod
    def refusal(model, adapter: str) -> str | None:
        """Why `adapter` cannot be merged into a copy of the weights (None when it can)."""
        from peft.tuners.lora import Linear as LoraLinear

        for name, m in lora_layers(model, adapter):
            w = m.base_layer.weight
            if not isinstance(m, LoraLinear) or not w.is_floating_point() or type(w) is not torch.nn.Parameter:
                return (f"merged rollouts need plain floating-point Linear layers; {name} is "
                        f"{type(m).__name__} over {type(w).__name__}[{w.dtype}] (quantized base?)")
            if m.use_dora.get(adapter, False):
                return f"merged rollouts do not support DoRA ({name})"
        return None

    def __init__(self, model, adapter: str):
        reason = self.refusal(model, adapter)
        if reason is not None:
            raise ValueError(reason)
        self.layers, self.weights = [], {}
        for name, m in lora_layers(model, adapter):
            self.layers.append((m, adapter))
            self.weights[f"{name}.base_layer.weight"] = torch.empty_like(m.base_layer.weight)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.weights.values())
        log.info("merged rollout weights: %d layers, %.3f GB extra memory", len(self.layers), self.nbytes / 1e9)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute W + delta in place (same storage: a captured graph keeps reading it)."""
        for (m, adapter), buf in zip(self.layers, self.weights.values()):
            buf.copy_(m.base_layer.weight)
            buf.add_(m.get_delta_weight(adapter).to(buf.dtype))

    @contextlib.contextmanager
    def swapped_in(self):
        """The policy as a plain forward, for transformers' `generate`: each LoRA-wrapped weight replaced by its
        merged copy (refreshed now) and those layers' adapters off. Afterwards the base weights are the same tensors
        as before (put back, not subtracted: no rounding drift) and each layer's adapters as they were; other
        modules (a `modules_to_save` copy) are not touched."""
        self.refresh()
        kept = []
        try:
            for (m, _), buf in zip(self.layers, self.weights.values()):
                kept.append((m, m.base_layer.weight.data, m._disable_adapters))
                m.base_layer.weight.data = buf
                m._disable_adapters = True
            yield
        finally:
            for m, weight, disabled in kept:
                m.base_layer.weight.data = weight
                m._disable_adapters = disabled


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k, then nucleus filtering (tokens outside get -inf), as HF's TopK/TopP warpers do; fixed shapes."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits
