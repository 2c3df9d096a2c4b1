"""The parts of the rollout decode engine (`lit_ft.online.engine`) around its loop: the grouped decode attention, the
rollout copies of the policy's weights (merged, de-quantized), the top-k/top-p filter, and which models the engine
can serve."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lit_ft.models import families

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


def engine_unsupported(model, length: int | None = None) -> str | None:
    """Why the engine cannot serve `model` (None when it can): attention kinds its 4D mask does not fit. A sliding
    window is served where it covers the whole static cache (`length` = prompt + new tokens): those layers then
    attend as full ones. Without a length only the window's presence is known; the engine checks it again
    when it allocates its cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config(decoder=True) if hasattr(base.config, "get_text_config") else base.config
    impl = getattr(base.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (the engine builds sdpa/eager masks)"
    window, kinds = families.sliding_window(cfg)
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"layers other than full or sliding attention ({', '.join(sorted(kinds))})"
    if length is not None and window is not None and window < length:
        return (f"a sliding window of {window} tokens, shorter than the rollout's prompt + new tokens ({length}): its "
                f"static cache would roll over")
    if families.alibi_positions(cfg):
        return "ALiBi positions, built from a 2-D padding mask (the engine passes a 4-D one)"
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


def _four_bit(layer) -> bool:
    """A bitsandbytes 4-bit linear layer (NF4/FP4): its weight packed, with the state that de-quantizes it."""
    w = getattr(layer, "weight", None)
    return type(w).__name__ == "Params4bit" and getattr(w, "quant_state", None) is not None


def _copy_layout(base) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of a base layer's rollout copy: a plain weight's own; a 4-bit weight's logical shape in the
    layer's compute dtype (what bitsandbytes de-quantizes it to for its matmul)."""
    w = base.weight
    if _four_bit(base):
        return tuple(w.quant_state.shape), getattr(base, "compute_dtype", None) or w.quant_state.dtype
    return tuple(w.shape), w.dtype


class _Dequantized(torch.nn.Module):
    """A 4-bit base layer's stand-in during a rollout: a plain linear over its de-quantized (and, merged, LoRA-folded)
    copy, taking and giving the dtypes the 4-bit layer does (input cast to the compute dtype, output back)."""

    def __init__(self, weight: Tensor, base: torch.nn.Module):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)  # never in a state dict
        # the 4-bit layer itself, not a submodule: its bias is read at each call (bitsandbytes may recast it)
        object.__setattr__(self, "base", base)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        bias = self.base.bias
        bias = None if bias is None else bias.to(self.weight.dtype)
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, bias).to(x.dtype)


class RolloutWeights:
    """A rollout copy of the policy's LoRA-wrapped base weights, swapped in for a rollout by `swapped_in()` (both
    decode engines; `SampleGenerations(merged=True)`).

    `merge=True` (`sampling.merged`): the copy is W + scale * B @ A and those layers' LoRA branches are off, so the
    decode runs plain matmuls. Plain floating-point bases: the copy in the weights' dtype, put in place of each base
    weight's data. 4-bit bitsandbytes bases (NF4/FP4, QLoRA): the weights de-quantized into the copy in the layers'
    compute dtype, each 4-bit layer replaced by a plain linear over it for the rollout.

    `merge=False` (`sampling.dequantize`, 4-bit bases): the copy is the de-quantized W alone and the LoRA branches
    stay on, so the decode multiplies by the weights the 4-bit layers de-quantize to, de-quantized once a rollout
    (bit for bit their numbers on the CPU; on CUDA bitsandbytes multiplies with its own 4-bit GEMM kernel, which
    rounds differently from cuBLAS over the copy).

    The copy is recomputed at each `swapped_in()` (it follows the optimizer) in place (a captured graph keeps reading
    it). Memory: one copy of each weight it covers (`nbytes`, logged): for a 4-bit base nearly 4x its 4-bit weights
    in bf16. 8-bit bases and DoRA are refused.
    """

    @staticmethod
    def covered(model, adapter: str, merge: bool) -> list:
        """The LoRA layers of `adapter` the copy covers: all of them when merging, the 4-bit ones otherwise."""
        return [m for _, m in lora_layers(model, adapter) if merge or _four_bit(m.base_layer)]

    @classmethod
    def bytes_needed(cls, model, adapter: str, merge: bool = True) -> int:
        """What the copy would take (without allocating it)."""
        return sum(math.prod(shape) * dtype.itemsize
                   for shape, dtype in (_copy_layout(m.base_layer) for m in cls.covered(model, adapter, merge)))

    @staticmethod
    def refusal(model, adapter: str, merge: bool = True) -> str | None:
        """Why the copy cannot be made (None when it can)."""
        from peft.tuners.lora import Linear as LoraLinear

        layers = lora_layers(model, adapter)
        if not merge and not any(_four_bit(m.base_layer) for _, m in layers):
            return "de-quantized rollouts need a 4-bit base (model.base.quantization nf4 or fp4)"
        for name, m in layers:
            w = getattr(m.base_layer, "weight", None)
            plain = isinstance(m, LoraLinear) and type(w) is torch.nn.Parameter and w.is_floating_point()
            if not (plain or (_four_bit(m.base_layer) and hasattr(m, "get_delta_weight"))):
                return (f"{'merged' if merge else 'de-quantized'} rollouts need Linear layers over floating-point or "
                        f"4-bit (bitsandbytes) weights; {name} is {type(m).__name__} over "
                        f"{type(w).__name__}[{getattr(w, 'dtype', None)}] (an 8-bit base?)")
            if m.use_dora.get(adapter, False):
                return f"{'merged' if merge else 'de-quantized'} rollouts do not support DoRA ({name})"
        return None

    def __init__(self, model, adapter: str, merge: bool = True):
        reason = self.refusal(model, adapter, merge)
        if reason is not None:
            raise ValueError(reason)
        self.adapter, self.merge = adapter, merge
        self.layers = self.covered(model, adapter, merge)
        self.bases = [m.base_layer for m in self.layers]  # the layers' own, whatever is swapped in meanwhile
        self.copies: list[Tensor] = []
        self.stand_ins: list[_Dequantized | None] = []  # 4-bit layers: the plain linear swapped in for them
        for base in self.bases:
            shape, dtype = _copy_layout(base)
            copy = torch.empty(shape, dtype=dtype, device=base.weight.device)
            self.copies.append(copy)
            self.stand_ins.append(_Dequantized(copy, base) if _four_bit(base) else None)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.copies)
        four = sum(s is not None for s in self.stand_ins)
        rank_zero_info(f"{'merged' if merge else 'de-quantized'} rollout weights: {len(self.layers)} layers ({four} "
                       f"de-quantized from 4 bits), {self.nbytes / 1e9:.3f} GB extra memory")

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the copy in place (same storage: a captured graph keeps reading it)."""
        from_four_bit = None
        for m, base, copy, stand_in in zip(self.layers, self.bases, self.copies, self.stand_ins):
            if stand_in is not None:
                if from_four_bit is None:
                    from bitsandbytes.functional import dequantize_4bit as from_four_bit
                copy.copy_(from_four_bit(base.weight.data, base.weight.quant_state))
            else:
                copy.copy_(base.weight)
            if self.merge:
                copy.add_(m.get_delta_weight(self.adapter).to(copy.dtype))

    @contextlib.contextmanager
    def swapped_in(self):
        """The copy refreshed now and in place of each covered weight (a 4-bit layer: its plain stand-in), those
        layers' LoRA branches off when merged. Afterwards the base weights are the same tensors as before (put back,
        not subtracted: no rounding drift) and each layer's adapters as they were; other modules (a
        `modules_to_save` copy) are not touched."""
        self.refresh()
        kept = []
        try:
            for m, base, copy, stand_in in zip(self.layers, self.bases, self.copies, self.stand_ins):
                kept.append((m, base, base.weight.data, m._disable_adapters))
                if stand_in is not None:
                    m.base_layer = stand_in
                else:
                    base.weight.data = copy
                if self.merge:
                    m._disable_adapters = True
            yield
        finally:
            for m, base, weight, disabled in kept:
                if m.base_layer is not base:
                    m.base_layer = base
                else:
                    base.weight.data = weight
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
