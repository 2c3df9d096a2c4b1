"""PEFT LoRA on a loaded base for `lit_ft.models.build_model`: check the settings, resolve the targets against the
model's layers, make a new adapter (with its start, `LoraSpec.init`) or load a saved one (a causal-LM adapter
re-typed under a score model).

PiSSA and OLoRA starts move part of each adapted base weight into the adapter (W = W_res + s*B0*A0). The start
(A0, B0) is kept on the model (`INIT_ATTR`), written into checkpoints, re-applied on resume (`restore_start`) and
used by the export to write an ordinary LoRA on the unchanged base (`plain_lora`).

Every name is re-exported by `lit_ft.models`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Literal

import torch

from lit_ft.models import families
from lit_ft.errors import ConfigError, loading
from lit_ft.models.spec import LoraSpec, ModelSpec

MUTATING_INITS = ("pissa", "olora")
"""Starts that rewrite the adapted base weights into the residual W - s*B0*A0."""
INIT_ATTR = "lit_ft_lora_init"
"""On a model adapted with a mutating start: {PEFT state-dict key: A0 or B0} of every LoRA matrix."""


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
        init_lora_weights=_peft_init(lora),
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
    )


def _peft_init(lora: LoraSpec) -> bool | str:
    if lora.init == "pissa":
        return f"pissa_niter_{lora.init_svd_iters}" if lora.init_svd_iters else "pissa"
    return {"default": True, "gaussian": "gaussian", "olora": "olora", "loftq": True}[lora.init]


def check_start(lora: LoraSpec | None, base: ModelSpec, reference: bool = False) -> None:
    """Refuse a `model.lora.init` the run cannot honour, before any weight is loaded. `reference`: the stage
    compares the policy with the base without its adapter (DPO, PPO, GRPO), so the adapter must start as a no-op
    on the unchanged base."""
    if lora is None or lora.init in ("default", "gaussian"):
        return
    key = f"model.lora.init={lora.init}"
    if base.adapter is not None:
        raise ConfigError(f"{key} starts a new adapter, but model.base.adapter continues {base.adapter}: drop one")
    if reference:
        raise ConfigError(
            f"{key}: DPO, PPO and GRPO compare the policy with its reference, the base with the adapter switched off, which "
            f"must be the starting policy; a {lora.init} adapter is not a no-op at step 0"
            + (" and it rewrites the shared base" if lora.init in MUTATING_INITS else "")
            + ". Train SFT with it and start this stage from that export (model.sft_adapter), or use init default")
    quantized = base.quantization != "none"
    if lora.init in MUTATING_INITS:
        if quantized:
            raise ConfigError(f"{key} rewrites the adapted base weights, which a quantized base (model.base."
                              f"quantization={base.quantization}) cannot hold exactly: use init loftq for a 4-bit "
                              "base, or quantization none")
        if lora.use_dora:
            raise ConfigError(f"{key} with model.lora.use_dora: DoRA's magnitude vectors are taken from the rewritten "
                              "base, so the export cannot be converted back to the unchanged base; choose one")
        if lora.experts:
            raise ConfigError(f"{key} with model.lora.experts: PEFT starts only linear layers this way, not fused "
                              "expert weights")
    elif lora.init == "loftq":
        if base.quantization not in ("nf4", "fp4"):
            raise ConfigError(f"{key} fits the adapter to the 4-bit quantization error of the base: set "
                              f"model.base.quantization nf4 (now {base.quantization})")
        if str(base.name_or_path or "").endswith(".gguf"):
            raise ConfigError(f"{key} reads the base's original weights from its safetensors files; a .gguf base "
                              "has none")


def _loftq(model, base: ModelSpec, svd_iters: int) -> None:
    """LoftQ on a 4-bit base (Li et al. 2023, one alternation, as PEFT's `replace_lora_weights_loftq`): per adapted
    layer, s*B*A = the best rank-r approximation of W - Q(W), with W read lazily from the base's safetensors files.
    Written here because PEFT's version runs on CUDA only."""
    import bitsandbytes.functional as bnbf

    from lit_ft.models.identity import local_weights_path, saved_tensor

    path = local_weights_path(base.name_or_path, base.revision)
    if path is None or not any(Path(path).glob("*.safetensors")):
        raise ConfigError(f"model.lora.init=loftq reads the base's original weights from safetensors files: none "
                          f"found for {base.name_or_path or 'the bundled default'} ({path})")
    for name, layer in _lora_layers(model).items():
        weight = layer.get_base_layer().weight
        if getattr(weight, "quant_state", None) is None:
            continue  # a layer left unquantized (bitsandbytes skips some): nothing to correct
        key = name.removeprefix("base_model.model.") + ".weight"
        original = saved_tensor(path, key)
        if original is None:
            raise ConfigError(f"model.lora.init=loftq: {path} has no tensor {key} for the layer {name}")
        residual = original.to(weight.device, torch.float32) - bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
        r, scale = layer.r["default"], layer.scaling["default"]
        if svd_iters:
            u, sigma, v = torch.svd_lowrank(residual, q=min(r + 8, *residual.shape), niter=svd_iters)
            vh = v.T
        else:
            u, sigma, vh = torch.linalg.svd(residual, full_matrices=False)
        root = (sigma[:r] / scale).sqrt()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b.copy_((u[:, :r] * root).to(b))
            a.copy_((root[:, None] * vh[:r]).to(a))


@contextlib.contextmanager
def _seeded(on: bool):
    """The fast SVD of pissa_niter_N is random: seeded (the caller's generators untouched), so a resume on the same
    device rebuilds the same start. Default starts keep drawing from the run's seed."""
    if not on:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        yield


def lora_start(model) -> dict[str, torch.Tensor]:
    """The adapter's LoRA matrices now, keyed as in its saved files."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    """PEFT state-dict key prefix (`...q_proj`) -> the LoRA layer, for the default adapter."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def restore_start(model, saved: dict[str, torch.Tensor] | None) -> None:
    """After a resume: make the base residual the one the checkpoint's adapter was trained against. The start is
    recomputed when the model is built (same settings, seeded); where it came out differently (another device's
    SVD), each base weight gets s*(B0'A0' - B0*A0) added, so W_res + s*B*A is again the trained model."""
    current = getattr(model, INIT_ATTR, None)
    if not saved or current is None:
        return
    for prefix, layer in _lora_layers(model).items():
        a_key, b_key = f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"
        if a_key not in saved or (torch.equal(saved[a_key], current[a_key])
                                   and torch.equal(saved[b_key], current[b_key])):
            continue
        weight = layer.get_base_layer().weight
        scale = layer.scaling["default"]
        delta = current[b_key].float() @ current[a_key].float() - saved[b_key].float() @ saved[a_key].float()
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        with torch.no_grad():
            weight.add_((scale * delta).to(weight.device, weight.dtype))
    setattr(model, INIT_ATTR, {k: v.clone() for k, v in saved.items()})


def plain_lora(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor], config):
    """An adapter trained from a PiSSA/OLoRA start as an ordinary LoRA on the unchanged base. Training gives
    W_res + s*B*A = W + s*(B*A - B0*A0) = W + s*[B | -B0][A ; A0]: rank 2r, with alpha set so the scale s is the
    same (PEFT's conversion, Meng et al. 2024). Returns (weights, config)."""
    out = dict(weights)
    for key, value in start.items():
        if key not in out:
            raise ConfigError(f"model.lora.init: the adapter has no {key} to convert (its start does not match it)")
        if ".lora_A." in key:
            out[key] = torch.cat([out[key], value.to(out[key])], dim=0)
        else:
            out[key] = torch.cat([out[key], -value.to(out[key])], dim=1)
    config = copy.deepcopy(config)
    config.r *= 2
    config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    config.init_lora_weights = True
    return out, config


def adapt(model, lora: LoraSpec, task: Literal["causal_lm", "score"], base: ModelSpec | None = None):
    """`get_peft_model` with the errors user settings cause as ConfigErrors naming the setting (PEFT's own error
    chained), and ``modules_to_save`` names that match no module refused (PEFT ignores them silently). `base`: the
    spec the model was loaded from, for the `lora.init` starts (checked by `check_start`)."""
    from peft import get_peft_model

    names = [n for n, _ in model.named_modules() if n]
    missing = [m for m in lora.modules_to_save or [] if not any(n == m or n.endswith("." + m) for n in names)]
    if missing:
        tops = sorted({n.rsplit(".", 1)[-1] for n in names if "." not in n or n.count(".") <= 1})
        raise ConfigError(f"model.lora.modules_to_save: {missing} name no module of the model "
                          f"(its top-level modules: {tops})")
    config = lora_config(lora, task, model)  # its own ConfigErrors (unmatched target names) pass unwrapped
    transposed = lora.init == "olora" and sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                                  if type(m).__name__ == "Conv1D"})
    if transposed:  # PEFT's OLoRA start ignores fan_in_fan_out: the forward would then fail on the shapes
        raise ConfigError(f"model.lora.init=olora: this model keeps its projections transposed ({transposed}: "
                          "GPT-2-style Conv1D), which PEFT's OLoRA start does not handle; use init pissa")
    try:
        with _seeded(lora.init in MUTATING_INITS):
            model = get_peft_model(model, config)
    except (ValueError, TypeError, KeyError) as e:  # peft.utils.error.PeftError is a ValueError
        raise ConfigError(f"model.lora: PEFT refused the settings ({type(e).__name__}: {e})") from e
    if lora.init == "loftq":
        _loftq(model, base if base is not None else ModelSpec(), lora.init_svd_iters)
    if lora.init in MUTATING_INITS:
        setattr(model, INIT_ATTR, lora_start(model))
    return model


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
    weights = get_peft_model_state_dict(model, save_embedding_layers=False)
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
