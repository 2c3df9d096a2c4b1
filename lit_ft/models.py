"""One model factory for every stage: load, quantize, prepare for k-bit training, checkpoint, adapt with LoRA.

`ModelSpec` says which weights and how to hold them; `LoraSpec` says how to adapt them. `build_model` turns
them into a PEFT model. Nothing here knows about Lightning, so the modules, the export command and the tests
share one code path.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from lit_ft import families
from lit_ft.default_model import DEFAULT_MODEL_NAME, default_model_dir  # noqa: F401 (re-exported)
from lit_ft.errors import ConfigError
from lit_ft.integrity import check_adapter_base, weights_fingerprint
from lit_ft.validation import check_spec


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Llama's projection names (the explicit list for Llama-style models; the default `all` finds them itself)."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSpec:
    """Low-rank adapters (Hu et al. 2021) as PEFT builds them."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with `use_rslora`)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: ["all"])
    """Layers to adapt: `all` = every linear projection inside the decoder layers, found in the loaded model
    (attention and MLP, fused ones too; never the LM head, embeddings or MoE router: QLoRA, Dettmers et al.
    2023), `attention` or `mlp` = one part of them, or explicit layer names (`[q_proj, v_proj]`), which must
    exist in the model. The resolved names are logged and written to adapter_config.json."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    modules_to_save: list[str] | None = None
    """Extra modules trained in full and saved with the adapter (for example a score head)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024)."""
    experts: bool = False
    """Mixture-of-experts models: also adapt the experts' fused weights (PEFT `target_parameters`: r x (in + out)
    adapter weights per expert and weight, and each forward materialises every adapted expert weight's full-size
    update, about the size of that layer's expert weights in the compute dtype). PEFT runs these without
    dropout, so `dropout` is set to 0. The router is never adapted."""

    def __post_init__(self):
        check_spec(self, "model.lora")  # alpha 0 would leave every update at zero: lora_B stays 0 (no warning)
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"model.lora.target_modules={targets!r}: expected a non-empty list of module names")


@dataclass
class ModelSpec:
    """Which base model to load and how to hold it in memory."""

    name_or_path: str | None = None
    """Hub id, local HF directory or `.gguf` file; None uses the bundled SmolLM2-135M-Instruct."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when `name_or_path` is a hub id."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype of non-quantized layers; auto = bfloat16 on a CUDA device that supports it, else float32."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel: `auto` lets transformers pick what the family supports (SDPA where it can, eager for
    families that refuse SDPA); packed SFT rows are checked to get per-sequence masks from the kernel."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    quantization: Literal["none", "nf4", "fp4", "int8"] = "none"
    """bitsandbytes quantization of the frozen base: 4-bit NF4/FP4 (QLoRA) or LLM.int8()."""
    double_quant: bool = True
    """Quantize the 4-bit quantization constants too (QLoRA's double quantization)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Dtype the 4-bit layers de-quantize to for their matmuls."""
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    """Storage dtype of the packed 4-bit weights; FSDP needs it equal to the other weights' dtype (bfloat16)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (non-reentrant, so frozen inputs keep LoRA trainable)."""
    liger_kernel: bool = False
    """Swap RMSNorm, SwiGLU and RoPE for Liger's fused Triton kernels (`pip install liger-kernel`; CUDA only).
    Same function, fewer passes over memory and fewer saved activations. Liger patches transformers' RoPE
    function for the whole process (its own design), so every model of that architecture built later uses it."""
    adapter: str | None = None
    """An existing PEFT adapter directory to start from (for example the SFT adapter under RM or PPO); when
    set, it is trained further instead of a new adapter made from the LoRA settings."""

    def __post_init__(self):
        check_spec(self, "model.base")

    def identity(self) -> dict:
        """What a checkpoint records so a resume can refuse a different base: the name, revision, quantization and
        a fingerprint of the weights themselves (`integrity.weights_fingerprint`; None for a hub id that is not in
        the local cache)."""
        return {
            "name_or_path": self.name_or_path or DEFAULT_MODEL_NAME,
            "revision": self.revision,
            "quantization": self.quantization,
            "weights": weights_fingerprint(local_weights_path(self.name_or_path, self.revision)),
        }


# ---------------------------------------------------------------------------------------------- loading


def local_weights_path(name_or_path: str | None, revision: str | None = None) -> str | None:
    """The local file or directory holding a base's weights: the bundled default's cache, a `.gguf` file, a local
    directory, or a hub id's snapshot in the local cache (None when it is not there; nothing is downloaded)."""
    if name_or_path is None:
        return default_model_dir()
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: no fingerprint
        return None


def resolve_name(name_or_path: str | None, kind: Literal["model", "tokenizer"] = "model") -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name or None) for `from_pretrained` of a model or a tokenizer (a
    tokenizer may come from a directory that holds only the tokenizer files)."""
    if name_or_path is None:
        return default_model_dir(), None
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"model.name_or_path: GGUF file {p} does not exist")
        check_gguf_magic(p)
        return str(p.parent), p.name
    if p.exists():
        markers = ["config.json", "adapter_config.json"]
        if kind == "tokenizer":
            markers += ["tokenizer_config.json", "tokenizer.json"]
        if not any((p / m).exists() for m in markers):
            what = "config.json" if kind == "model" else "config.json or tokenizer files"
            raise ConfigError(f"model.name_or_path: {p} is a directory without {what}")
        return str(p), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ConfigError(f"model.name_or_path: local path {name_or_path} does not exist")
    return name_or_path, None  # a hub id: downloads only because the user named it


def check_gguf_magic(path: Path) -> None:
    """A GGUF file starts with the bytes ``GGUF``; anything else would fail deep inside the gguf reader."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"GGUF":
        raise ConfigError(f"model.base.name_or_path: {path} is not a GGUF file (it starts with {head!r}, not b'GGUF')")


_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")


def check_model_files(where: str, gguf: str | None) -> None:
    """A local model directory must hold weights (a folder with only config.json and tokenizer files is a
    tokenizer, not a model): say so by setting rather than as transformers' file-search error."""
    p = Path(where)
    if gguf or not p.is_dir() or (p / "adapter_config.json").exists():
        return
    if not any(next(p.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ConfigError(f"model.base.name_or_path: {p} has no weights (no *.safetensors or *.bin file); "
                          "point it at a full model directory")


# ---------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str | None = None, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer of a model, with a pad token guaranteed.

    A tokenizer without a pad token pads with its EOS (the collators keep the EOS of each response in the
    labels, so this is safe). A tokenizer with neither is refused.
    """
    from transformers import AutoTokenizer

    where, gguf = resolve_name(name_or_path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(
            where, gguf_file=gguf, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as e:  # OSError (missing files), tokenizers' parse errors of a half-written tokenizer.json
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"model.base.name_or_path (data.tokenizer): cannot load a tokenizer from "
                          f"'{name_or_path or where}': {type(e).__name__}: {first}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError(f"tokenizer of '{name_or_path}' has neither a pad nor an EOS token; set one")
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------- model builder


def resolve_dtype(spec: ModelSpec, device: torch.device | None = None) -> torch.dtype:
    if spec.dtype != "auto":
        return _DTYPES[spec.dtype]
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32


def quantization_config(spec: ModelSpec):
    if spec.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if spec.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quantization,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[spec.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8 if spec.quant_storage == "uint8" else _DTYPES[spec.quant_storage],
    )


def load_base(spec: ModelSpec, task: Literal["causal_lm", "score"] = "causal_lm", device=None):
    """Load the frozen base model: causal LM, or a sequence scorer with a 1-output head."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    where, gguf = resolve_name(spec.name_or_path)
    check_model_files(where, gguf)
    dtype = resolve_dtype(spec, device)
    kwargs = dict(dtype=dtype, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    if spec.attn_implementation != "auto":
        kwargs["attn_implementation"] = spec.attn_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
    qcfg = quantization_config(spec)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        # Quantized weights are placed on load: on this process's own device, never spread over several.
        kwargs["device_map"] = {"": torch.device(device) if device is not None else _default_device()}
    # A family without a sequence-classification class scores with a `score` head on its causal LM (same export).
    scorer = task == "score" and families.has_sequence_classifier(_config(where, gguf, spec))
    cls = AutoModelForSequenceClassification if scorer else AutoModelForCausalLM
    if scorer:
        kwargs["num_labels"] = 1
    try:
        model = cls.from_pretrained(where, **kwargs)
    except ValueError as e:
        if "attention implementation" not in str(e):
            raise
        raise ConfigError(f"model.attn_implementation={spec.attn_implementation}: {str(e).splitlines()[0]} "
                          "(`auto` picks one the family supports)") from e
    if task == "score" and not scorer:
        families.add_score_head(model, where)
    families.quantize_skipped_linears(model, qcfg)  # Falcon's FalconLinear, which transformers does not convert
    families.check_quantized(model, spec.quantization)
    if task == "score" and model.config.pad_token_id is None:
        # The score is read at the last non-pad token, which transformers finds through pad_token_id.
        model.config.pad_token_id = model.config.eos_token_id
    if spec.quantization in ("nf4", "fp4"):
        disable_cpu_4bit_repacking(model)
    if task == "causal_lm":  # after the repacking switch: this is an eval-mode pass
        families.check_logits(model)  # lit_ft's logits (loss, log-probs) must be the model's own
    return model


def _config(where: str, gguf: str | None, spec: ModelSpec):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(where, gguf_file=gguf, trust_remote_code=spec.trust_remote_code,
                                      revision=spec.revision)


def disable_cpu_4bit_repacking(model) -> int:
    """Keep bitsandbytes 4-bit layers differentiable on CPU after an eval pass.

    On CPUs with AVX512-BF16, bitsandbytes (0.49+) repacks a ``Linear4bit`` weight in place the first time it runs
    in eval mode without grad (validation, generation, PPO rollouts) and from then on multiplies with a kernel that
    has no backward: the input gradient through every frozen 4-bit layer is silently dropped, so LoRA weights
    below it train on a wrong gradient. The repacking also fails outright for layers narrower than the 64-wide
    quantization block. Returns the number of layers switched to the differentiable de-quantize path.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def prepare_for_training(model, spec: ModelSpec):
    """Freeze the base, enable checkpointing, keep frozen inputs from cutting the LoRA graph.

    This is what `peft.prepare_model_for_kbit_training` does, minus its blanket float32 up-cast of every
    non-quantized weight (embeddings and LM head included), which costs gigabytes on large vocabularies
    and buys nothing for a frozen bf16 base.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.liger_kernel:
        apply_liger_kernel(model)
    if spec.gradient_checkpointing:
        # Non-reentrant checkpointing (torch.utils.checkpoint, use_reentrant=False) tracks gradients to LoRA
        # weights even when the checkpointed block's inputs do not require grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_liger_kernel(model) -> None:
    """Fused RMSNorm / SwiGLU / RoPE from Liger-Kernel (Hsu et al. 2024) on a loaded base model.

    Only the layer kernels: the loss stays lit_ft's chunked cross-entropy, so Liger's fused linear cross-entropy
    (which replaces the model's forward) is never applied.
    """
    try:
        from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise ConfigError("model.liger_kernel needs the liger-kernel package: `pip install liger-kernel`") from e
    if not torch.cuda.is_available():
        raise ConfigError("model.liger_kernel needs a CUDA device (its kernels are Triton GPU kernels)")
    _apply_liger_kernel_to_instance(
        model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False
    )


def compile_decoder_layers(model, backend: str = "inductor") -> int:
    """`torch.compile` each decoder layer in place (the blocks repeat, so one compiled graph serves them all).

    Layers, not the whole model: the embedding, mask construction and lit_ft's chunked loss stay eager, graphs stay
    small (fast compiles) and gradient checkpointing still wraps each compiled layer. Inductor fuses the
    element-wise work (RMSNorm's float32 round trip, RoPE, SwiGLU, LoRA dropout and adds) and its min-cut
    partitioner recomputes cheap element-wise results in backward instead of saving them. Returns the number of
    layers compiled.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(inner.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"compile: {type(inner).__name__} has no decoder `layers` to compile")
    for layer in layers:
        layer.compile(backend=backend)
    return len(layers)


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
    model = prepare_for_training(load_base(spec, task, device), spec)
    if spec.adapter is not None:
        check_adapter_base(spec.adapter, spec.identity(), "model.base.adapter")
        model = load_adapter(model, spec.adapter, task, trainable)
    elif lora is not None:
        model = adapt(model, lora, task)
    else:
        raise ConfigError("model.lora is null and no model.base.adapter is given: nothing would be trained")
    # from_pretrained returns eval mode; training mode turns LoRA dropout on (evaluation code switches it off).
    return model.train(trainable)


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
        return PeftModel.from_pretrained(model, path, is_trainable=trainable)
    if saved not in (None, TaskType.CAUSAL_LM) or config.peft_type != "LORA":
        raise ConfigError(f"model.adapter: {path} is a {config.peft_type} {saved} adapter; a reward model can "
                          "start from a LoRA CAUSAL_LM (SFT) or SEQ_CLS (reward) adapter")
    config = dataclasses.replace(config, task_type=TaskType.SEQ_CLS, inference_mode=not trainable)
    model = get_peft_model(model, config)
    # The new head keeps its fresh initialisation: it is handed back as it is, the LoRA weights come from `path`.
    weights = get_peft_model_state_dict(model)
    loaded = load_peft_weights(path)
    strays = sorted(set(loaded) - set(weights))
    if strays:
        raise ConfigError(f"model.adapter: {path} does not fit this base model (unexpected {strays[:3]})")
    weights.update(loaded)
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ConfigError(f"model.adapter: {path} does not fit this base model ({result.unexpected_keys[:3]})")
    return model


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
