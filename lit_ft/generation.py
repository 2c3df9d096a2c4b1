"""Batched sampling with the KV cache from left-padded prompts (log-probs of the responses: `lit_ft.roles`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_ft.errors import ConfigError
from lit_ft.rl import response_mask_after_eos
from lit_ft.validation import check_spec


@dataclass
class SamplingSpec:
    """How responses are sampled (the PPO rollout and the demo's sample tables)."""

    max_new_tokens: int = 64
    """Longest response."""
    min_new_tokens: int | None = None
    """With max_new_tokens, draw each batch's response length uniformly in [min, max] (TRL's LengthSampler)."""
    do_sample: bool = True
    """Sample; False is greedy decoding."""
    temperature: float = 1.0
    """Softmax temperature; the log-probs of PPO divide the logits by the same value."""
    top_k: int = 0
    """0 disables top-k filtering (PPO samples from the full distribution)."""
    top_p: float = 1.0
    """1.0 disables nucleus filtering."""
    engine: Literal["auto", "static", "hf"] = "auto"
    """Decoder: `static` = `lit_ft.rollout.DecodeEngine` (static KV cache, fixed-shape step replayed as a CUDA graph
    on CUDA, eager elsewhere); `hf` = transformers' `generate`; `auto` = `static` on CUDA for models it serves,
    else `hf`."""
    merged: bool = False
    """With the static engine and a non-quantized base: decode with the policy LoRA merged into a rollout copy of
    the LoRA-wrapped weights (costs one copy of them, logged; refreshed every rollout)."""
    cuda_graph: bool = True
    """Capture the static engine's decode step as a CUDA graph (CUDA only)."""
    check_every: int = 8
    """The static engine reads 'every row finished?' on the host every this many tokens."""

    def __post_init__(self):
        check_spec(self, "model.sampling")
        if self.min_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"model.sampling.min_new_tokens={self.min_new_tokens}: expected at most "
                              f"model.sampling.max_new_tokens={self.max_new_tokens}")


@torch.no_grad()
def generate(model, input_ids, attention_mask, spec: SamplingSpec, eos_token_id: int, pad_token_id: int,
             max_new_tokens: int | None = None):
    """Sample responses for left-padded prompts [B, P].

    Returns (responses [B, R], mask [B, R]); tokens after the first EOS are replaced by pad and masked out.
    """
    if attention_mask[:, -1].min() == 0:
        raise ValueError("generate() needs left-padded prompts (the last column must be real tokens)")
    kwargs = dict(
        max_new_tokens=max_new_tokens or spec.max_new_tokens,
        do_sample=spec.do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    if spec.do_sample:
        kwargs.update(temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    responses = out[:, input_ids.shape[1]:]
    mask = response_mask_after_eos(responses, eos_token_id, pad_token_id).long()
    return responses.masked_fill(mask == 0, pad_token_id), mask
