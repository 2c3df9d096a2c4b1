"""Helpers that Lightning's distributed strategies take from a config (see configs/strategies/)."""

from __future__ import annotations

import torch

# Transformer blocks that are not called "...DecoderLayer" in transformers.
_OTHER_BLOCKS = ("GPT2Block", "GPTJBlock", "GPTNeoXLayer", "BloomBlock", "CodeGenBlock")


def is_decoder_layer(module: torch.nn.Module) -> bool:
    """One transformer block of a decoder-only model (LlamaDecoderLayer, Qwen2DecoderLayer, GPT2Block, ...)."""
    name = type(module).__name__
    return name.endswith("DecoderLayer") or name in _OTHER_BLOCKS


def wrap_decoder_layers(module: torch.nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP auto-wrap policy: one FSDP unit per decoder layer (the root unit holds embeddings and head).

    Each unit then holds a layer's frozen base weights and its LoRA weights together; with
    `use_orig_params=True` FSDP lets one flat parameter mix frozen and trainable tensors (all of one dtype).
    Used as `trainer.strategy.init_args.auto_wrap_policy: lit_ft.strategies.wrap_decoder_layers`.
    """
    return True if recurse else is_decoder_layer(module)
