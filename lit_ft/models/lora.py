"""PEFT LoRA on a loaded base for `lit_ft.models.build_model`: check the settings, resolve the targets against the
model's layers, make a new adapter or load a saved one (a causal-LM adapter re-typed under a score model).

Every name is re-exported by `lit_ft.models`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

from lit_ft.models import families
from lit_ft.errors import ConfigError, loading
from lit_ft.models.spec import LoraSpec


def check_lora(lora: LoraSpec, model=None) -> list[str] | str:
    """Warn about the well-known bad practices; with the loaded `model`, return the resolved target names (an
    explicit name that matches none of its layers is a ConfigError, see `families.resolve_targets`)."""
    if lora.r > 64:
        warnings.warn(
            f"model.lora.r={lora.r}: ranks far above 64 rarely beat r=16..64 and cost memory (Hu et al. 2021; "
            "Dettmers et al. 2023)",
            stacklevel=2,
        )
    if model is None:  # no model to resolve against: PEFT's own all-linear for the shortcut (PEFT takes it only as
        # the whole string, not inside a list; its all-linear also skips the LM head)
        if any(t in families.SHORTCUTS for t in lora.target_modules):
            return "all-linear"
        return list(lora.target_modules)
    targets = families.resolve_targets(model, list(lora.target_modules))
    kinds = families.linear_layers(model)
    covered = [p for p in kinds if any(("." + p).endswith("." + t) or t.endswith("." + p) for t in targets)]
    if any(kinds[p] == "attention" for p in kinds) and not any(kinds[p] == "attention" for p in covered):
        warnings.warn(
            f"model.lora.target_modules={targets} adapts none of the attention projections: adapting every "
            "projection (`all`) matches full fine-tuning far better (QLoRA, Dettmers et al. 2023)",
            stacklevel=2,
        )
    return targets


def lora_config(lora: LoraSpec, task: Literal["causal_lm", "score"], model=None):
    """PEFT's LoraConfig; with the loaded `model`, targets resolved against its layers (and MoE experts)."""
    from peft import LoraConfig, TaskType

    targets = check_lora(lora, model)
    experts = families.expert_parameters(model) if lora.experts and model is not None else []
    if lora.experts and not experts and model is not None:
        raise ConfigError("model.lora.experts: this model has no fused MoE expert weights to adapt")
    if experts and lora.dropout:
        warnings.warn(f"model.lora.experts: PEFT adapts expert weights without dropout; dropout {lora.dropout} -> 0",
                      stacklevel=2)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=0.0 if experts else lora.dropout,
        target_modules=targets,
        target_parameters=experts or None,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )


def adapt(model, lora: LoraSpec, task: Literal["causal_lm", "score"]):
    """`get_peft_model` with the errors user settings cause as ConfigErrors naming the setting (PEFT's own error
    chained), and ``modules_to_save`` names that match no module refused (PEFT ignores them silently)."""
    from peft import get_peft_model

    names = [n for n, _ in model.named_modules() if n]
    missing = [m for m in lora.modules_to_save or [] if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:
        tops = sorted({n.rsplit(".", 1)[-1] for n in names if "." not in n or n.count(".") <= 1})
        raise ConfigError(f"model.lora.modules_to_save: {missing} name no module of the model "
                          f"(its top-level modules: {tops})")
    config = lora_config(lora, task, model)  # its own ConfigErrors (unmatched target names) pass unwrapped
    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:  # peft.utils.error.PeftError is a ValueError
        raise ConfigError(f"model.lora: PEFT refused the settings ({type(e).__name__}: {e})") from e


def load_adapter(model, path: str, task: Literal["causal_lm", "score"], trainable: bool):
    """Put the PEFT adapter saved in `path` on `model` (a base model built for `task`).

    A causal-LM adapter (the SFT adapter) under a score model starts the reward model from the SFT policy, as
    InstructGPT does (Ouyang et al. 2022, sec. 3.5): the same LoRA weights on the same trunk, re-typed as a
    SEQ_CLS adapter so that a new `score` head trains and saves with it. The export is then an ordinary reward
    adapter on the base model, independent of the SFT adapter it started from.
    """
    import dataclasses

    from peft import PeftConfig, PeftModel, TaskType, get_peft_model
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    if not (Path(path) / "adapter_config.json").exists():
        raise ConfigError(f"model.adapter: {path} has no adapter_config.json")
    config = PeftConfig.from_pretrained(path)
    saved = config.task_type
    if task == "causal_lm" or saved == TaskType.SEQ_CLS:
        if task == "causal_lm" and saved == TaskType.SEQ_CLS:
            raise ConfigError(
                f"model.adapter: {path} is a reward adapter (task_type SEQ_CLS) and has no language-model head; "
                "a causal-LM stage needs a CAUSAL_LM adapter such as the SFT export"
            )
        with loading(path, "model.base.adapter"):
            return PeftModel.from_pretrained(model, path, is_trainable=trainable)
    if saved not in (None, TaskType.CAUSAL_LM) or config.peft_type != "LORA":
        raise ConfigError(f"model.adapter: {path} is a {config.peft_type} {saved} adapter; a reward model can "
                          "start from a LoRA CAUSAL_LM (SFT) or SEQ_CLS (reward) adapter")
    config = dataclasses.replace(config, task_type=TaskType.SEQ_CLS, inference_mode=not trainable)
    model = get_peft_model(model, config)
    # The new head keeps its fresh initialisation: it is handed back as it is, the LoRA weights come from `path`.
    weights = get_peft_model_state_dict(model)
    with loading(path, "model.base.adapter"):
        loaded = load_peft_weights(path)
    strays = sorted(set(loaded) - set(weights))
    if strays:
        raise ConfigError(f"model.adapter: {path} does not fit this base model (unexpected {strays[:3]})")
    weights.update(loaded)
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ConfigError(f"model.adapter: {path} does not fit this base model ({result.unexpected_keys[:3]})")
    return model
