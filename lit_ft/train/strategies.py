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
    Used as `trainer.strategy.init_args.auto_wrap_policy: lit_ft.train.strategies.wrap_decoder_layers`.
    """
    return True if recurse else is_decoder_layer(module)


def is_fsdp(trainer) -> bool:
    """The trainer runs Lightning's FSDPStrategy (by name: no import of the FSDP stack where it is not used)."""
    return trainer is not None and type(trainer.strategy).__name__ == "FSDPStrategy"


def configure_gradient_clipping(module, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
    """`LightningModule.configure_gradient_clipping` of the lit_ft modules: Lightning's clipping, except clipping
    by norm under FSDP, which Lightning's FSDP precision plugin refuses ("not supported for FSDPPrecision", seen on
    the H200 with configs/sft.yaml's `gradient_clip_val: 1.0`). There the root FSDP unit clips: it computes the
    global norm over every shard and scales the local gradients alike."""
    if is_fsdp(module.trainer) and gradient_clip_val and (gradient_clip_algorithm or "norm") == "norm":  # a str enum
        module.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)


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
        if is_fsdp(trainer):
            from torch.distributed.fsdp import FullyShardedDataParallel

            stack.enter_context(FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False))
        yield


FSDP_INFIX = "_fsdp_wrapped_module."


def gathered_model_state(trainer) -> dict | None:
    """The LightningModule's `model` state gathered from every rank when the strategy shards it (FSDP), keyed by the
    model's own parameter and buffer names (which hold FSDP's `_fsdp_wrapped_module.` infix at each wrapped layer);
    None where `model.state_dict()` is whole. Collective under FSDP: every rank calls it; rank zero gets the tensors
    (on the CPU with several ranks), as Lightning gathers a full checkpoint."""
    if not is_fsdp(trainer):
        return None
    full = trainer.strategy.lightning_module_state_dict()  # FSDP's full state dict: keys without the infix
    model = trainer.lightning_module.model
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    keys = {n: "model." + n.replace(FSDP_INFIX, "") for n in names}
    return {n: full[k] for n, k in keys.items() if k in full}  # empty on ranks other than zero


@contextlib.contextmanager
def manual_gradient_sync(trainer):
    """Turn DDP's all-reduce after every backward off for the duration (a no-op without DDP).

    For manual optimization whose backward passes touch different parameters before one optimizer step (PPO: the
    policy adapter's backward, then the value adapter's, each finished before the adapters switch): DDP's reducer
    expects every trainable parameter in every backward. Inside this context gradients stay local;
    `average_gradients` then averages them once per optimizer step.
    """
    model = trainer.strategy.model if trainer is not None else None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def average_gradients(trainer, params: list[torch.nn.Parameter], contributed: bool) -> bool:
    """Under DDP (inside `manual_gradient_sync`), average `params`' gradients over the ranks in one all-reduce (a
    missing gradient counts as zero).

    `contributed`: whether this rank back-propagated anything since the last step (PPO's ratio guard may skip every
    minibatch of a step on one rank); the mean is over contributing ranks only. Returns whether any rank
    contributed, i.e. whether the optimizer should step. Every rank must call it, with `params` in the same order.
    Other multi-process strategies reduce gradients themselves; they only get the step decision agreed.
    """
    if trainer is None or trainer.world_size == 1 or not torch.distributed.is_initialized():
        return contributed
    if not isinstance(getattr(trainer.strategy, "model", None), torch.nn.parallel.DistributedDataParallel):
        return trainer.strategy.reduce_boolean_decision(contributed, all=False)
    device = params[0].device
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([float(contributed)], device=device)])
    torch.distributed.all_reduce(flat)
    count = float(flat[-1])
    if count == 0:
        return False
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).div(count).to(p.dtype)
        offset += g.numel()
    return True
