"""Bytes of the weights, adapters, gradients and optimizer state of a stage, counted on a meta-device model.

The model is built from its config only (`AutoConfig` + `from_config` under ``torch.device("meta")``: shapes and
dtypes, no storage) and adapted with PEFT exactly as the stage adapts the real one, so every adapter tensor, head
and `modules_to_save` copy is counted from the real module tree. What the meta model cannot show is replaced by
bitsandbytes' storage layout, per quantized layer (`quantized_linear_bytes`). `tests/test_plan.py` checks every
figure here against the tensors of the real model, byte for byte.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lit_ft.errors import ConfigError
from lit_ft.models import ModelSpec, resolve_name

NF4_BLOCK = 64  # bitsandbytes' 4-bit blocksize (transformers' BitsAndBytesConfig default)
NESTED_BLOCK = 256  # double quantization: 8-bit absmax in blocks of 256, one fp32 scale + offset each (QLoRA 2.2)
NF4_CODE = 16  # the 16 fp32 NF4 levels each layer's quant state holds (its own copy, per layer)
DYNAMIC_CODE = 256  # the 256 fp32 levels of the 8-bit dynamic map of the nested absmax (per layer)
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizer state blocksize
ADAM8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for tensors smaller than this (min_8bit_size)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_config(spec: ModelSpec):
    """The HF config of a base without its weights: a local directory, a `config.json` file, a `.gguf` file's
    metadata, the bundled default's cached directory, or a hub id from the local cache (nothing is downloaded)."""
    from transformers import AutoConfig

    name = spec.name_or_path
    path = Path(name).expanduser() if name else None
    try:
        if path is not None and path.suffix == ".json":
            if not path.is_file():
                raise ConfigError(f"model.base.name_or_path: {path} does not exist")
            data = json.loads(path.read_text())
            if "model_type" not in data:
                raise ConfigError(f"model.base.name_or_path: {path} has no model_type (not a transformers config)")
            return AutoConfig.for_model(data.pop("model_type"), **data)
        where, gguf = resolve_name(name)
        return AutoConfig.from_pretrained(where, gguf_file=gguf, revision=spec.revision, local_files_only=True,
                                          trust_remote_code=spec.trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base.name_or_path: no config for '{name}' in the local files or cache "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a directory "
                          "holding its config.json") from e


def meta_model(spec: ModelSpec, task: str, config, dtype: torch.dtype):
    """The frozen base as `build_model` would load it, on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    if task == "score":
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = config.eos_token_id
    # `auto` passes nothing: transformers picks the family's kernel, as `models.load_base` lets it
    attn = {} if spec.attn_implementation == "auto" else {"attn_implementation": spec.attn_implementation}
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code, **attn)
    model.requires_grad_(False)
    return model


def attention_kernel(spec: ModelSpec, config) -> str:
    """The attention implementation a load would use: the setting, or for `auto` what transformers picks for the
    family (read off a meta-device build of its config)."""
    if spec.attn_implementation != "auto":
        return spec.attn_implementation
    return getattr(meta_model(spec, "causal_lm", config, torch.float32).config, "_attn_implementation", None) or "sdpa"


def unquantized_modules(model) -> set[str]:
    """Names of the linear layers bitsandbytes leaves in the model dtype, by transformers' rule: the output
    embeddings, layers whose weight is tied to another, and the module owning the model's last parameter (the
    `score` head of a sequence classifier). Embeddings and norms are no linear layers and are never quantized."""
    owners = {id(p): n for n, m in model.named_modules() for p in m.parameters(recurse=False)}
    skip = set()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = list(model.named_parameters(remove_duplicate=False))
    seen: dict[int, int] = {}
    for _, p in names:
        seen[id(p)] = seen.get(id(p), 0) + 1
    for n, m in model.named_modules():
        w = getattr(m, "weight", None)
        if m is out or (w is not None and seen.get(id(w), 0) > 1):
            skip.add(n)
    if names:
        skip.add(owners[id(names[-1][1])])
    return skip


def quantized_linear_bytes(out_features: int, in_features: int, quantization: str, double_quant: bool) -> int:
    """Device bytes of one bitsandbytes linear weight with its quantization constants.

    4-bit (NF4/FP4; Dettmers et al. 2023, sec. 2): two weights a byte; one absmax per block of 64 weights, fp32,
    or with double quantization 8-bit (1 byte a block) plus, per 256 blocks, an fp32 scale, one fp32 offset and the
    256-entry fp32 dynamic map of the nested state; each layer also holds its 16-entry fp32 code.
    int8 (LLM.int8(); Dettmers et al. 2022): one byte a weight plus one fp32 scale per output row (`SCB`).
    """
    n = out_features * in_features
    if quantization == "int8":
        return n + 4 * out_features
    blocks = math.ceil(n / NF4_BLOCK)
    total = math.ceil(n / 2) + 4 * NF4_CODE
    if double_quant:
        return total + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + 4 * DYNAMIC_CODE
    return total + 4 * blocks


@dataclass
class Counts:
    """What a stage holds in weights (bytes), split the way the plan reports it."""

    base: dict[str, int] = field(default_factory=dict)
    """Frozen base weights and buffers by storage kind (`bfloat16`, `nf4`, `int8`, ...)."""
    adapters: dict[str, int] = field(default_factory=dict)
    """Adapter and head parameters by role (`trainable`, `frozen`)."""
    trainable: list[tuple[int, torch.dtype]] = field(default_factory=list)
    """(numel, dtype) of every trainable tensor: gradients and optimizer state follow from these."""

    @property
    def base_bytes(self) -> int:
        return sum(self.base.values())

    @property
    def adapter_bytes(self) -> int:
        return sum(self.adapters.values())


def _is_adapter(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name or ".ranknum" in name


def count(model, spec: ModelSpec, keep: set[str], cast: torch.dtype | None = None) -> Counts:
    """Bytes of a (meta, PEFT-wrapped) model: the base by storage kind, the adapters, the trainable tensors.

    `keep`: `unquantized_modules` of the base before it was adapted. `cast`: the dtype Lightning's `*-true` half
    precision casts every floating tensor to (None: as built)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantized = spec.quantization != "none"
    prefix = "base_model.model." if inner is not model else ""
    counts, seen = Counts(), set()

    def dtype_of(t):
        return cast if cast is not None and t.is_floating_point() else t.dtype

    for mname, module in model.named_modules():
        short = mname.removeprefix(prefix).replace(".base_layer", "").replace(".original_module", "")
        is_q = (quantized and isinstance(module, nn.Linear) and not _is_adapter(mname)
                and short not in keep and not any(c for c in module.children()))
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}"
            if is_q and pname == "weight":
                key = "int8" if spec.quantization == "int8" else spec.quantization + ("+dq" if spec.double_quant else "")
                nbytes = quantized_linear_bytes(p.shape[0], p.shape[1], spec.quantization, spec.double_quant)
            else:
                dt = dtype_of(p)
                key, nbytes = str(dt).removeprefix("torch."), p.numel() * dt.itemsize
            if isinstance(p, nn.Parameter) and p.requires_grad:
                counts.adapters["trainable"] = counts.adapters.get("trainable", 0) + nbytes
                counts.trainable.append((p.numel(), dtype_of(p)))
            elif _is_adapter(full) or full.startswith(("value_head", "reward_head")):
                counts.adapters["frozen"] = counts.adapters.get("frozen", 0) + nbytes
            else:
                counts.base[key] = counts.base.get(key, 0) + nbytes
    return counts


def optimizer_state_bytes(trainable: list[tuple[int, torch.dtype]], optimizer: str) -> int:
    """Bytes of AdamW's two moments (exp_avg, exp_avg_sq) over the trainable tensors (Loshchilov & Hutter 2019).

    torch AdamW keeps them in each parameter's dtype; bitsandbytes' 32-bit AdamW in fp32; its 8-bit AdamW
    (Dettmers et al. 2022, "8-bit optimizers via block-wise quantization") one byte each plus one fp32 absmax per
    block of 256, except for tensors under 4096 elements, which keep fp32 state. The per-tensor `step` counter
    (a 0-d tensor, on the host for torch AdamW on CUDA) is not device memory and is not counted.
    """
    total = 0
    if optimizer.endswith("8bit") and any(numel >= ADAM8_MIN_SIZE for numel, _ in trainable):
        total += 2 * DYNAMIC_CODE * 4  # qmap1/qmap2: the two 256-entry fp32 quantization maps, shared by all tensors
    for numel, dtype in trainable:
        if optimizer == "adamw":
            total += 2 * numel * dtype.itemsize
        elif optimizer.endswith("8bit") and numel >= ADAM8_MIN_SIZE:
            total += 2 * (numel + 4 * math.ceil(numel / ADAM8_BLOCK))
        else:
            total += 2 * numel * 4
    return total


def read_adapter_config(path: str | None):
    """The PEFT config of an adapter directory, or None when there is none yet (the plan then assumes
    `model.lora`)."""
    if path is None or not (Path(path) / "adapter_config.json").exists():
        return None
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(path))


def resolve_dtype_for(spec: ModelSpec, target: str) -> torch.dtype:
    """`ModelSpec.dtype` on the plan's target device (auto = bfloat16 on CUDA, float32 elsewhere, as
    `models.resolve_dtype`)."""
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    return torch.bfloat16 if target == "cuda" else torch.float32
