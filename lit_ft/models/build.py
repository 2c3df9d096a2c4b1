"""One model factory for every stage: load, quantize, prepare for k-bit training, checkpoint, adapt with LoRA.

`build_model` turns a `ModelSpec` and a `LoraSpec` (`lit_ft.models.spec`) into a PEFT model. Nothing here knows
about Lightning, so the modules, the export command and the tests share one code path.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from lit_ft.errors import ConfigError
from lit_ft.models import families
from lit_ft.models.adapters import check_adapter_base
from lit_ft.models.load import load_base, prepare_for_training
from lit_ft.models.lora import adapt, check_start, load_adapter
from lit_ft.models.spec import LoraSpec, ModelSpec


def build_model(
    spec: ModelSpec,
    lora: LoraSpec | None,
    task: Literal["causal_lm", "score"] = "causal_lm",
    device=None,
    trainable: bool = True,
):
    """Load the base and return a `PeftModel` whose only trainable weights are the adapter (and its heads).

    With `spec.adapter` the existing adapter is loaded (trainable when `trainable`); otherwise a new one is
    made from `lora`.
    """
    check_start(lora, spec)  # before the weights load
    model = prepare_for_training(load_base(spec, task, device), spec)
    if spec.adapter is not None:
        check_adapter_base(spec.adapter, spec.identity(), "model.base.adapter")
        model = load_adapter(model, spec.adapter, task, trainable)
    elif lora is not None:
        model = adapt(model, lora, task, spec)
    else:
        raise ConfigError("model.lora is null and no model.base.adapter is given: nothing would be trained")
    if task == "score" and trainable:
        fp32_head(model)
    # from_pretrained returns eval mode; training mode turns LoRA dropout on (evaluation code switches it off).
    return model.train(trainable)


def fp32_head(model) -> None:
    """Train the score head in float32 whatever the base's dtype, as PEFT keeps the LoRA weights (its
    `autocast_adapter_dtype`): in bfloat16, Adam's steps of about lr on weights whose spacing is coarser (2.4e-4 at
    |w| = 0.06, and the head's weights grow) round away, and the head stops learning. The score is read with the
    hidden state cast to the head's dtype (`lit_ft.online.scoring.scores_from_hidden`)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32 and ".score." in f".{name}":
            p.data = p.data.float()


def describe(model) -> str:
    """Trainable parameters and memory footprint, for the start-of-run log."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    footprint = model.get_memory_footprint() if hasattr(model, "get_memory_footprint") else 0
    line = (
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        f" || memory footprint: {footprint / 2**20:.1f} MiB"
    )
    targets = families.describe_targets(model) if hasattr(model, "peft_config") else ""
    return line + ("\n" + targets if targets else "")


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (adapters, heads): what a checkpoint holds instead of the frozen base."""
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k in names}


@contextlib.contextmanager
def eval_mode(model):
    """Temporarily switch to eval mode (no dropout), restoring the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
