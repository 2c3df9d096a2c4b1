"""What differs between model families, read from the loaded model itself rather than from a list of names.

- Which layers LoRA adapts: every linear projection inside the decoder layers (attention and MLP, fused ones such
  as Phi-3's `qkv_proj` / `gate_up_proj`, Falcon's `query_key_value`, GPT-2's `Conv1D`), never the LM head, the
  embeddings or a mixture-of-experts router (`resolve_targets`); MoE experts' fused weights on request
  (`expert_parameters`, PEFT's `target_parameters`).
- What the model applies after its LM head (`logit_transform`): Granite's `logits_scaling` divides, Cohere's
  `logit_scale` multiplies, Gemma 2's `final_logit_softcapping` caps; the head's own bias (Phi, GPT-J) is applied
  by calling the head. `check_logits` proves on the loaded weights that lit_ft's logits equal the model's own.
- Whether a quantized load really quantized the decoder's linear layers (`check_quantized`), and whether the
  attention implementation derives packed rows' masks from `position_ids` (`check_packing`).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, nn

from lit_ft.errors import ConfigError
from lit_ft.losses import LogitTransform
from lit_ft.models.identity import saved_tensor

SHORTCUTS = ("all", "attention", "mlp")
"""`target_modules` entries that expand per model: every decoder linear, its attention ones, the others."""


def _is_linear(module: nn.Module | None) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt and Falcon's FalconLinear subclass nn.Linear; GPT-2 uses Conv1D;
    # a layer PEFT already wrapped counts as the linear it wraps.
    if hasattr(module, "base_layer"):
        return _is_linear(module.get_base_layer())
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _named_linears(root: nn.Module):
    """(name, module) of the linear layers under `root`, LoRA's own internals left out."""
    for name, module in root.named_modules():
        if name and _is_linear(module) and not any(p.startswith("lora_") or p == "base_layer" for p in name.split(".")):
            yield name, module


def _is_router(leaf: str, module: nn.Module) -> bool:
    """MoE routers and gates: a few weights that pick experts; adapting them changes routing, not content."""
    return leaf in ("gate", "router") or leaf.endswith("_gate") or "router" in type(module).__name__.lower()


def _unwrap(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the decoder's repeated blocks: the largest ModuleList of one block type."""
    best, best_size = None, -1
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise ConfigError(f"{type(_unwrap(model)).__name__}: no repeated decoder layers found")
    return best


def linear_layers(model) -> dict[str, str]:
    """{path inside a decoder layer: 'attention' | 'mlp'} of every linear projection (routers left out).

    A projection belongs to the attention when a module on its path is named like one (`self_attn`, `attn`,
    `attention`, `self_attention`); everything else in the block is the MLP (OPT's `fc1`/`fc2` sit in the layer).
    """
    _, layers = decoder_layers(model)
    out = {}
    for layer in layers:
        for name, module in _named_linears(layer):
            leaf = name.rsplit(".", 1)[-1]
            if not _is_router(leaf, module):
                parts = name.split(".")[:-1]
                out[name] = "attention" if any("attn" in p or "attention" in p for p in parts) else "mlp"
    return out


def model_linear_names(model) -> list[str]:
    """Leaf names of every linear layer of the model (what an explicit `target_modules` entry can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, _ in _named_linears(_unwrap(model))})


def resolve_targets(model, requested: list[str]) -> list[str]:
    """The `target_modules` PEFT gets: shortcuts expanded to this model's layers, explicit names checked.

    Shortcuts become leaf names (`q_proj`, ...) when PEFT's suffix matching of those names picks exactly the
    layers meant, else full module names (GPT-2's `c_proj` is both the attention output and the MLP output, so
    `attention` there needs `transformer.h.0.attn.c_proj`, ...; a model with fused MoE expert weights always). An explicit name must match a module of the model
    (PEFT matches a name or a `.name` suffix); one that matches nothing (a typo such as `v_prj`, or another
    family's name) is a ConfigError listing the model's linear layers.
    """
    if not requested:
        raise ConfigError("model.lora.target_modules is empty: name layers or use 'all', 'attention' or 'mlp'")
    inner = _unwrap(model)
    prefix, layers = decoder_layers(model)
    parts = linear_layers(model)
    names = [n for n, _ in inner.named_modules() if n]
    chosen: list[str] = []  # full names of the decoder linears the shortcuts ask for
    explicit: list[str] = []
    for entry in requested:
        if entry in SHORTCUTS:
            chosen += [f"{prefix}.{i}.{p}" for i in range(len(layers)) for p, kind in parts.items()
                       if entry in ("all", kind)]
        elif any(n == entry or n.endswith("." + entry) for n in names):
            explicit.append(entry)
        else:
            raise ConfigError(
                f"model.lora.target_modules: '{entry}' matches no layer of {type(inner).__name__}; its "
                f"linear layers are {model_linear_names(model)} (or use 'all', 'attention', 'mlp')"
            )
    if not chosen and not explicit:
        raise ConfigError(f"model.lora.target_modules={requested}: no linear layer of that kind in this model")
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in chosen))
    by_leaf = {n for n, _ in _named_linears(inner) if n.rsplit(".", 1)[-1] in leaves}
    # A model with fused MoE expert weights gets full names, explicit leaves included: PEFT (0.22+) reads a leaf name
    # such as `down_proj` as its transformers-4 name, which also targets the experts' fused parameter of that name
    # (`model.lora.experts` decides that, through `target_parameters`).
    moe = bool(expert_parameters(model))
    picked = leaves if by_leaf == set(chosen) and not moe else list(dict.fromkeys(chosen))
    if moe:  # an explicit leaf too: the modules it names, in full
        explicit = [n for e in explicit for n in names if n == e or n.endswith("." + e)]
    return list(dict.fromkeys(picked + explicit))


def routes_experts(config) -> bool:
    """The model sends each token to some of its experts by the token's values (a mixture of experts), read from its
    config (a multimodal one's text config)."""
    config = getattr(config, "text_config", None) or config
    return any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts"))


def attention_kinds(config) -> set[str]:
    """The kinds of layers the config declares (`layer_types`: full_attention, sliding_attention, ...); empty when it
    declares none, {"unknown"} when a per-layer config refuses a global read."""
    try:
        return set(getattr(config, "layer_types", None) or ())
    except Exception:  # noqa: BLE001  (a per-layer config that refuses a global read: not a shape this knows)
        return {"unknown"}


def sliding_window(config) -> tuple[int | None, set[str]]:
    """(the sliding window, the kinds of attention layers) the model's config declares; the window None where no
    layer slides (Qwen2 with `use_sliding_window: false`, or a window set with only full layers)."""
    window = getattr(config, "sliding_window", None)
    kinds = attention_kinds(config)
    if not kinds:
        kinds = {"sliding_attention" if window and getattr(config, "use_sliding_window", True) else "full_attention"}
    return (window if "sliding_attention" in kinds else None), kinds


def alibi_positions(config) -> bool:
    """Whether the model adds ALiBi biases that it builds from a 2-D padding mask (Bloom, MPT, Falcon with
    `alibi`): such a model cannot take a 4-D mask of lit_ft's own (the decode engine's, shared-prompt rows')."""
    return config.model_type in ("bloom", "mpt") or bool(getattr(config, "alibi", False))


def expert_parameters(model) -> list[str]:
    """In-layer names of MoE experts' fused weights (`mlp.experts.gate_up_proj`, ...): 3-D parameters
    [experts, out, in] that no linear layer holds, so only PEFT's `target_parameters` can adapt them."""
    _, layers = decoder_layers(model)
    return sorted({n for n, p in layers[0].named_parameters() if p.dim() == 3 and "experts" in n})


def describe_targets(model) -> str:
    """One log line: what LoRA adapts, and what it leaves out on a mixture-of-experts model."""
    config = getattr(model, "peft_config", {})
    lines = []
    for name, cfg in config.items():
        targets = sorted(cfg.target_modules) if isinstance(cfg.target_modules, (set, list)) else cfg.target_modules
        params = list(getattr(cfg, "target_parameters", None) or [])
        line = f"LoRA '{name}': target_modules={targets}"
        experts = expert_parameters(model)
        if params:
            line += f", target_parameters={params} (MoE experts adapted)"
        elif experts:
            line += (f"; MoE expert weights {experts} are NOT adapted (model.lora.experts: true adapts them); "
                     "the router is never adapted")
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- logits


def logit_transform(model, temperature: float = 1.0) -> LogitTransform:
    """What `model` applies to `lm_head(hidden)` before its loss and sampling, with `temperature` on top."""
    cfg = _unwrap(model).config
    scale, softcap = 1.0, getattr(cfg, "final_logit_softcapping", None)
    if getattr(cfg, "logits_scaling", None) is not None:
        # Granite divides by it (Granite, GraniteMoE, ...); HyperCLOVA X multiplies.
        s = float(cfg.logits_scaling)
        scale = s if cfg.model_type.startswith("hyperclovax") else 1.0 / s
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere multiplies
        scale = float(cfg.logit_scale)
    return LogitTransform(scale=scale, softcap=float(softcap) if softcap else None, temperature=temperature)


def lm_logits(model, hidden: Tensor, temperature: float = 1.0) -> Tensor:
    """Logits exactly as `model` computes them (its head with its bias and any LoRA on it, then its scaling or
    soft-capping), divided by the sampling `temperature`: fp32 (fp64 for fp64 hidden states)."""
    head = _unwrap(model).get_output_embeddings()
    return logit_transform(model, temperature).apply(head(hidden))


@torch.no_grad()
def check_logits(model) -> None:
    """Prove on the loaded weights that `lm_logits` of the decoder's hidden states equals the model's own
    `forward().logits` (a family that applies something unknown after its head would train on a wrong loss)."""
    inner = _unwrap(model)
    vocab = inner.get_output_embeddings().weight.shape[0]
    device = inner.get_output_embeddings().weight.device
    ids = torch.arange(1, 6, device=device).remainder(vocab).unsqueeze(0)
    was_training = inner.training
    inner.eval()
    try:
        theirs = inner(input_ids=ids, use_cache=False).logits.float()
        hidden = inner.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        ours = lm_logits(inner, hidden).float()
    finally:
        inner.train(was_training)
    tol = (1e-4 if theirs.dtype == torch.float32 and hidden.dtype == torch.float32 else 2e-2) * theirs.abs().max()
    err = (ours - theirs).abs().max()
    if not err <= tol + 1e-5:
        raise ConfigError(
            f"{inner.config.model_type}: lit_ft's logits differ from the model's own by {float(err):.3g} (max logit "
            f"{float(theirs.abs().max()):.3g}): this family applies something after its LM head that lit_ft does "
            "not know (see lit_ft.models.families.logit_transform)"
        )


# ---------------------------------------------------------------------------------------------- quantization


# nn.Linear subclasses whose forward is exactly `x @ W.T + b` (Falcon's FalconLinear only reorders the bias add):
# safe to swap for a bitsandbytes 4-bit layer when transformers skipped them.
_PLAIN_LINEAR_SUBCLASSES = {"FalconLinear"}


def quantize_skipped_linears(model, qcfg) -> list[str]:
    """4-bit-quantize the decoder linears transformers left in full precision because their class is a subclass
    of nn.Linear (it converts exact nn.Linear only): Falcon's FalconLinear. Returns the names replaced."""
    if qcfg is None or not getattr(qcfg, "load_in_4bit", False):
        return []
    import bitsandbytes as bnb

    _, layers = decoder_layers(model)
    done = []
    for layer in layers:
        for name, old in list(_named_linears(layer)):
            if type(old).__name__ not in _PLAIN_LINEAR_SUBCLASSES or _is_quantized(old):
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=qcfg.bnb_4bit_compute_dtype,
                                    compress_statistics=qcfg.bnb_4bit_use_double_quant,
                                    quant_type=qcfg.bnb_4bit_quant_type, quant_storage=qcfg.bnb_4bit_quant_storage,
                                    device="meta")
            weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, quant_type=qcfg.bnb_4bit_quant_type,
                                       compress_statistics=qcfg.bnb_4bit_use_double_quant,
                                       quant_storage=qcfg.bnb_4bit_quant_storage, module=new)
            new.weight = weight.to(old.weight.device)  # moving a Params4bit to a device quantizes it
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data, requires_grad=False)
            parent, _, leaf = name.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, leaf, new)
            done.append(name)
    return sorted(set(done))


def check_quantized(model, quantization: str) -> None:
    """After a bitsandbytes load: every decoder linear must be a 4-bit / 8-bit layer (a ConfigError names those
    that are not: transformers converts only exact `nn.Linear`, so Falcon's `FalconLinear` stays full precision
    and QLoRA would silently train a full-precision base). MoE expert weights, which bitsandbytes cannot
    quantize, are a warning with their size."""
    if quantization == "none":
        return
    _, layers = decoder_layers(model)
    left = sorted({n for n, m in _named_linears(layers[0]) if not _is_quantized(m)})
    left = [n for n in left if not _is_router(n.rsplit(".", 1)[-1], layers[0].get_submodule(n))]
    if left:
        raise ConfigError(
            f"model.quantization={quantization}: {type(_unwrap(model)).__name__}'s decoder layers {left} were not "
            "quantized by transformers (only exact nn.Linear layers are converted); use quantization: none"
        )
    experts = expert_parameters(model)
    if experts:
        n = sum(p.numel() for layer in layers for name, p in layer.named_parameters() if name in experts)
        warnings.warn(f"model.quantization={quantization}: MoE expert weights {experts} ({n:,} parameters) stay "
                      "unquantized: bitsandbytes quantizes linear layers only", stacklevel=2)


def _is_quantized(module: nn.Module) -> bool:
    module = module.get_base_layer() if hasattr(module, "base_layer") else module
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") or hasattr(module.weight, "quant_state")


# ---------------------------------------------------------------------------------------------- packing


@contextlib.contextmanager
def probing(inner):
    """The model in eval mode for a probe of its states (dropout off), its mode restored after."""
    was_training = inner.training
    inner.eval()
    try:
        yield
    finally:
        inner.train(was_training)


def states_agree(got: Tensor, want: Tensor) -> bool:
    """Hidden states of one probe computed two ways agree (2% of their scale: bf16 and fused kernels differ)."""
    got, want = got.float(), want.float()
    return torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()) + 1e-5)


@torch.no_grad()
def check_packing(model) -> None:
    """Packed rows carry no attention mask: the attention implementation must derive the block-diagonal causal
    mask from the restarting `position_ids`. Probed on the loaded model (two sequences packed in one row must give
    the hidden states they give alone) once per attention implementation (remembered on the model), for causal LMs
    and sequence classifiers alike; a ConfigError when it does not."""
    inner = _unwrap(model)
    impl = inner.config._attn_implementation
    if getattr(inner, "_lit_ft_packing_checked", None) == impl:
        return
    decoder = inner.get_decoder()
    embeddings = inner.get_input_embeddings().weight
    device, vocab = embeddings.device, embeddings.shape[0]
    a, b = torch.tensor([[1, 2, 3]], device=device) % vocab, torch.tensor([[4, 5]], device=device) % vocab
    with probing(inner):
        packed = decoder(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1]], device=device),
                         use_cache=False).last_hidden_state[:, 3:]
        alone = decoder(input_ids=b, use_cache=False).last_hidden_state
    if not states_agree(packed, alone):
        raise ConfigError(
            f"packing: {inner.config.model_type} with attn_implementation={inner.config._attn_implementation} lets a "
            "packed sequence attend to the one before it (its mask ignores position_ids); set the datamodule's "
            "packing: false, or use an attention implementation that supports packed rows"
        )
    inner._lit_ft_packing_checked = impl


# ---------------------------------------------------------------------------------------------- reward head


def has_sequence_classifier(config) -> bool:
    """Whether transformers has an `*ForSequenceClassification` class for this family (Granite, Cohere and
    GraniteMoE have none)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    remote = "AutoModelForSequenceClassification" in (getattr(config, "auto_map", None) or {})
    return config.model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES or remote


def add_score_head(model, where: str | None = None):
    """Give a causal LM the scalar `score` head that `*ForSequenceClassification` models carry (same name, shape
    [1, H], no bias, same initialisation), so a reward model needs no family-specific class: the reward is read
    from the decoder's last hidden state either way (`lit_ft.online.scoring.sequence_scores`), and the PEFT export
    (LoRA keys under the decoder, head under `score`) is the same. A head saved in `where` (a merged reward
    model) is loaded back."""
    inner = _unwrap(model)
    cfg = inner.config
    hidden = cfg.get_text_config().hidden_size
    weight = inner.get_output_embeddings().weight
    head = nn.Linear(hidden, 1, bias=False, dtype=weight.dtype if weight.is_floating_point() else torch.float32,
                     device=weight.device)
    with torch.no_grad():
        head.weight.normal_(0.0, getattr(cfg, "initializer_range", 0.02))
        saved = saved_tensor(where, "score.weight")
        if saved is not None:
            head.weight.copy_(saved)
    inner.score = head
    return model
