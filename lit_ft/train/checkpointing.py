"""Slim, self-describing Lightning checkpoints: trainable state only, the identity of the frozen base, a digest.

Resuming follows one rule per setting (`check_resume`; README "What happens when..."): settings that change what
the saved tensors mean are refused with the key named (the LoRA shape and scale, the optimizer type, the value
model's kind); every other changed setting applies from the resumed step on, with a log line saying so (the
learning rate, betas, eps and weight decay are put into the restored optimizer by `optim.apply_on_resume`; a new
run length continues the schedule from where it was; a new batch size continues from the same sample).
"""

from __future__ import annotations

import copy
import inspect
import dataclasses
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.train import integrity, optim
from lit_ft.errors import ConfigError
from lit_ft.models.adapters import write_base_identity
from lit_ft.models.build import trainable_state_dict
from lit_ft.models.card import finish_export
from lit_ft.models.identity import describe_identity, identity_diff
from lit_ft.models.lora import INIT_ATTR, plain_lora, restore_start
from lit_ft.train.strategies import FSDP_INFIX

IDENTITY_KEY = "lit_ft_base"
MODULE_KEY = "lit_ft_module"
RUN_KEY = "lit_ft_run"  # trainer settings a resume compares: accumulation, world size
START_KEY = "lit_ft_lora_init"  # a PiSSA/OLoRA adapter's start (A0, B0): the base residual it trains against
RESUMED_ATTR = "_lit_ft_resumed"  # on the module after a restore: the checkpoint's settings, for apply_on_resume


def slim(module: torch.nn.Module, checkpoint: dict, identity: dict, extra: dict | None = None,
         extra_state: dict | None = None) -> None:
    """Keep only trainable tensors in `checkpoint["state_dict"]` (plus the module's `extra_state` tensors: statistics, exempt from the finiteness check), record
    which base they belong to, add the module's `extra` entries and seal the whole checkpoint with its digest (`integrity.seal`).

    Call from `on_save_checkpoint`, as its last step. The frozen base is never written: a LoRA checkpoint is a
    small fraction of the base model's size.
    """
    state = checkpoint.get("state_dict")
    if state is None:
        checkpoint["state_dict"] = trainable_state_dict(module)
    else:
        # Filter what the strategy gathered (FSDP: the full, unsharded tensors) rather than reading parameters,
        # which under FSDP are local shards with wrapper prefixes in their names.
        names = {_unwrapped(n) for n, p in module.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in state.items() if k in names}
    checkpoint[IDENTITY_KEY] = identity
    checkpoint[MODULE_KEY] = class_path(type(module))
    # Hyper-parameters as plain dicts, so the checkpoint loads with torch.load(weights_only=True).
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None:
        checkpoint["hyper_parameters"] = {k: _plain(v) for k, v in hparams.items()}
    schedule = getattr(module, "_lit_ft_schedule", None)
    trainer = getattr(module, "_trainer", None)
    run = {"schedule_total": schedule["total"] if schedule else None}
    if trainer is not None:
        run.update(accumulate_grad_batches=trainer.accumulate_grad_batches, world_size=trainer.world_size)
    checkpoint[RUN_KEY] = run
    start = getattr(getattr(module, "model", None), INIT_ATTR, None)
    if start:
        checkpoint[START_KEY] = start
    checkpoint["state_dict"].update(extra_state or {})
    checkpoint[integrity.STATS_KEYS] = sorted(extra_state or {})
    checkpoint.update(extra or {})
    integrity.seal(checkpoint)


def class_path(cls: type) -> str:
    """`lit_ft.<Name>` for one of lit_ft's stages (each is on the public surface, and module paths may move), else
    its module path (a user's own subclass)."""
    if cls.__module__.startswith("lit_ft.stages."):
        return f"lit_ft.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrapped(name: str) -> str:
    """A parameter name without the FSDP / activation-checkpointing wrapper prefixes."""
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def as_spec(cls, value):
    """Accept a dataclass instance or its plain-dict form (as stored in a checkpoint); None stays None."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in value:
                v = value[f.name]
                inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
                kwargs[f.name] = as_spec(type(inner), v) if dataclasses.is_dataclass(inner) else v
        return cls(**kwargs)
    raise TypeError(f"expected {cls.__name__} or a dict, got {type(value).__name__}")


def check_identity(checkpoint: dict, identity: dict) -> None:
    """Refuse to load adapters onto a different base (weights, quantization; the name and revision only where a
    side has no fingerprint of the weights: the same weights under another path, a moved checkout or cache, are the
    same base)."""
    saved = checkpoint.get(IDENTITY_KEY)
    if saved is None:
        return
    fingerprinted = saved.get("weights") is not None and identity.get("weights") is not None
    keys = ("weights", "quantization") if fingerprinted else None
    diff = identity_diff(saved, identity, keys=keys)
    if diff:
        lines = ", ".join(f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(
            f"the checkpoint was trained on another base model ({lines}; checkpoint: "
            f"{describe_identity(saved)}; this run: {describe_identity(identity)}); set "
            "model.base to match or start a new run"
        )


# Settings whose change would make the saved tensors mean something else: a resume with another value is refused.
REFUSED_ON_RESUME = {
    "model.lora.r": "the saved LoRA matrices have the old rank",
    "model.lora.alpha": "the saved LoRA weights were trained under the old scale alpha / r",
    "model.lora.target_modules": "the saved adapter covers the old modules",
    "model.lora.bias": "the saved trainable biases follow the old setting",
    "model.lora.modules_to_save": "the saved adapter holds the old fully-trained modules",
    "model.lora.use_rslora": "the saved LoRA weights were trained under the old scale",
    "model.lora.init": "the saved adapter was trained from the old start (PiSSA/OLoRA: against the old base residual)",
    "model.lora.use_dora": "DoRA adds magnitude vectors the saved adapter does (not) have",
    "model.optim.optimizer": "the saved optimizer state belongs to the old optimizer",
    "model.optim.loraplus_lr_ratio": "the saved optimizer state has the old parameter groups (LoRA+ splits them)",
    "model.value_model": "the saved value model is of the old kind",
}


def _flat(prefix: str, value) -> dict:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not str(k).startswith("_"):  # LightningCLI's _class_path / _instantiator
                out.update(_flat(f"{prefix}.{k}", v))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def settings_diff(saved: dict, current: dict, prefix: str) -> dict[str, tuple]:
    """Dotted keys (e.g. `model.lora.r`) whose values differ between two hyper-parameter dicts."""
    a, b = _flat(prefix, _plain_dict(saved)), _flat(prefix, _plain_dict(current))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def with_defaults(saved: dict, module) -> dict:
    """A checkpoint's settings with each setting that did not exist when it was written (an `__init__` argument of
    the module, a field of one of its specs) set to its default (what that run used), so a setting added since is
    not read as a change."""
    out = dict(saved)
    for name, p in inspect.signature(type(module).__init__).parameters.items():
        if name != "self" and name not in out and p.default is not inspect.Parameter.empty \
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[name] = p.default
    for key, value in saved.items():
        spec = getattr(module, key, None)
        if dataclasses.is_dataclass(spec) and isinstance(value, dict):
            for f in dataclasses.fields(spec):
                if f.name not in value and f.default is not dataclasses.MISSING:
                    out[key] = {**out[key], f.name: f.default}
    return out


def _plain_dict(hparams) -> dict:
    return {k: _plain(v) for k, v in dict(hparams or {}).items()}


def check_resume(module, checkpoint: dict, identity: dict) -> None:
    """Everything a module checks in `on_load_checkpoint`, before any tensor is loaded: the digest (truncation and
    flipped bytes), the base's identity, and the rule for every changed setting (module docstring)."""
    trainer = getattr(module, "_trainer", None)
    integrity.verify(checkpoint, getattr(trainer, "ckpt_path", None) if trainer is not None else None)
    check_identity(checkpoint, identity)
    saved_class = str(checkpoint.get(MODULE_KEY) or "").rpartition(".")[2]
    if saved_class and saved_class != type(module).__qualname__:
        raise ConfigError(f"the checkpoint was written by {saved_class}, not {type(module).__qualname__}: resume it "
                          f"with the model it was trained as (--model lit_ft.{saved_class})")
    changed = settings_diff(with_defaults(checkpoint.get("hyper_parameters") or {}, module), module.hparams, "model")
    refused = {k: v for k, v in changed.items() if k in REFUSED_ON_RESUME}
    if refused:
        k, (old, new) = next(iter(refused.items()))
        raise ConfigError(f"{k} changed since the checkpoint ({old!r} -> {new!r}) and cannot change on resume: "
                          f"{REFUSED_ON_RESUME[k]}. Set it back, or start a new run from the exported adapter "
                          "(model.base.adapter)")
    for k, (old, new) in changed.items():
        if not k.startswith("model.optim."):  # the optimizer's own lines come from optim.apply_on_resume
            rank_zero_info(f"resume: {k} changed since the checkpoint ({old!r} -> {new!r}); the new value applies")
    run = checkpoint.get(RUN_KEY) or {}
    if trainer is not None:
        for key in ("accumulate_grad_batches", "world_size"):
            now = getattr(trainer, key)
            if run.get(key) is not None and run[key] != now:
                rank_zero_info(f"resume: trainer {key} changed since the checkpoint ({run[key]} -> {now}); the run "
                               "continues from the same sample, but is no longer an exact repeat of an uninterrupted one")
    restore_start(getattr(module, "model", None), checkpoint.get(START_KEY))
    setattr(module, RESUMED_ATTR, {"optim": (checkpoint.get("hyper_parameters") or {}).get("optim"),
                                  "schedule_total": run.get("schedule_total")})


class ResumeSettings(L.Callback):
    """After a restore, puts this run's optimizer settings into the restored optimizer and schedule
    (`optim.apply_on_resume`), logging each change; see the module docstring for the rule per setting."""

    def on_train_start(self, trainer, pl_module) -> None:
        saved = getattr(pl_module, RESUMED_ATTR, None)
        spec = getattr(pl_module, "optim", None)
        if saved is None or not isinstance(spec, optim.OptimSpec) or not trainer.optimizers:
            return
        setattr(pl_module, RESUMED_ATTR, None)
        saved_spec = as_spec(optim.OptimSpec, saved["optim"]) if saved.get("optim") else spec
        configs = trainer.lr_scheduler_configs
        scheduler = configs[0].scheduler if configs else None
        optim.apply_on_resume(pl_module, trainer.optimizers[0], scheduler, spec, saved_spec,
                              saved.get("schedule_total"), lambda m: rank_zero_info(f"resume: {m}"))


def save_adapter(model, path, tokenizer=None, identity: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write a PEFT adapter directory (what `PeftModel.from_pretrained` and serving stacks load unchanged),
    with the tokenizer files and `lit_ft_base.json` naming the base it was trained on. `state_dict`: the model's
    full state where its own `state_dict()` holds shards (FSDP: `strategies.gathered_model_state`)."""
    path = Path(path)
    start = getattr(model, INIT_ATTR, None)
    if state_dict is None and not start:
        model.save_pretrained(path, save_embedding_layers=False)  # lit_ft never resizes them
    else:
        _write_adapter(model, path, state_dict, start)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    if identity is not None:
        write_base_identity(path, identity)
    finish_export(path, identity)  # the base named portably (the hub id of the default) and a README model card
    return path


def _write_adapter(model, path: Path, state_dict: dict | None, start: dict | None) -> None:
    """PEFT's adapter files written here rather than by `save_pretrained`, for two cases. A gathered FSDP state:
    PEFT selects adapter tensors by the model's module names, which hold FSDP's infix at every wrapped decoder layer
    (PEFT strips it only at the root), so `state_dict` is keyed by those names and the infix leaves the written keys
    here, giving the plain names `PeftModel` loads. A PiSSA/OLoRA `start`: converted to an ordinary LoRA on the
    unchanged base (`plain_lora`)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)
    weights = {k.replace(FSDP_INFIX, ""): v.detach().cpu().contiguous() for k, v in weights.items()}
    config = copy.copy(model.peft_config["default"])
    if start:
        weights, config = plain_lora(weights, start, config)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.inference_mode = True  # as PeftModel.save_pretrained writes it
    config.save_pretrained(str(path))


def yaml_safe_hparams(module: L.LightningModule) -> None:
    """The module's saved hyper-parameters as plain values (dicts, lists, strings, numbers): the `hparams.yaml`
    loggers write then reads back with `yaml.safe_load` (a dataclass or a tuple would be a `!!python/object` tag).
    Call right after `save_hyperparameters()`; the specs themselves live on the module's attributes."""
    def plain(value):
        value = _plain(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    for key in list(module.hparams):
        module.hparams[key] = plain(module.hparams[key])
    module._hparams_initial = copy.deepcopy(module._hparams)


def load_trainable(module: torch.nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """`load_state_dict` for a lit_ft checkpoint, which holds the trainable tensors only (`slim`): the frozen base's
    tensors, built from `model.base`, are not reported missing (Lightning would otherwise warn with the name of every
    one of them); a trainable tensor the checkpoint lacks still is, and `strict` refuses it and strays alike.
    Use as a module's method: `load_state_dict = checkpointing.load_trainable`."""
    from torch.nn.modules.module import _IncompatibleKeys

    result = torch.nn.Module.load_state_dict(module, state_dict, strict=False, assign=assign)
    frozen = {_unwrapped(n) for n, p in module.named_parameters() if not p.requires_grad}
    frozen |= {_unwrapped(n) for n, _ in module.named_buffers() if n.startswith("model.")}
    missing = [k for k in result.missing_keys if _unwrapped(k) not in frozen]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"{type(module).__name__}: the checkpoint does not fit: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return _IncompatibleKeys(missing, result.unexpected_keys)
