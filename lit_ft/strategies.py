"""Helpers that Lightning's distributed strategies take from a config (see configs/strategies/)."""

from __future__ import annotations

import contextlib

import torch

from lit_ft.errors import ConfigError

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


def model_device(module, spec=None) -> torch.device | None:
    """The device a LightningModule builds its model on in `configure_model` (None outside a Trainer), after
    checking that the Trainer's strategy can hold that model (`spec`: its `ModelSpec`)."""
    trainer = module._trainer
    if trainer is None:
        return None
    strategy = trainer.strategy
    name = type(strategy).__name__
    if name == "DeepSpeedStrategy" and getattr(strategy, "zero_stage_3", False):
        # Lightning builds the model inside deepspeed.zero.Init, where transformers' from_pretrained (which only
        # handles ZeRO-3 through its own HfDeepSpeedConfig) initialises already-partitioned, empty tensors.
        raise ConfigError(
            "trainer.strategy: DeepSpeed ZeRO-3 is not supported by the lit_ft modules (the base model is loaded "
            "inside Lightning's zero.Init, which transformers does not expect); shard parameters with "
            "configs/strategies/fsdp.yaml, or use configs/strategies/deepspeed_zero2.yaml"
        )
    if name == "FSDPStrategy" and spec is not None and spec.quantization != "none":
        # Measured on one H200 (torch 2.11, bitsandbytes 0.50): training runs, then the first checkpoint fails
        # inside FSDP's full-state-dict hooks, which do not see the 4-bit layers' parameters.
        raise ConfigError(
            f"model.base.quantization={spec.quantization} under FSDP is not supported: FSDP cannot gather a "
            "checkpoint of a bitsandbytes-quantized base; QLoRA scales out with configs/strategies/ddp.yaml "
            "(the 4-bit base fits each GPU) or deepspeed_zero2.yaml"
        )
    return strategy.root_device


@contextlib.contextmanager
def for_generation(trainer):
    """Run the model outside the strategy's forward (`model.generate` in the sample callback and the PPO rollout)
    as the training forward runs it: in the precision plugin's context (autocast under `bf16-mixed`), and under
    FSDP with each unit's full weights gathered for the duration (read-only: `writeback=False`)."""
    if trainer is None:
        yield
        return
    strategy = trainer.strategy
    with contextlib.ExitStack() as stack:
        stack.enter_context(strategy.precision_plugin.forward_context())
        if type(strategy).__name__ == "FSDPStrategy":
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False))
        yield
