"""Loading a base model for `lit_ft.models.build_model`: locate its files, load the tokenizer and the weights
(dtype, bitsandbytes quantization, score head), and prepare the frozen base for training (gradient checkpointing,
Liger kernels, compiled decoder layers).

Nothing here knows about Lightning or PEFT; every name is re-exported by `lit_ft.models`.
"""

from __future__ import annotations

import copy
import functools
import types
from pathlib import Path
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from lit_ft.models import families
from lit_ft.models.default import default_model_dir
from lit_ft.errors import ConfigError, loading
from lit_ft.models.spec import ModelSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- loading


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


# ---------------------------------------------------------------------------------------------- base model


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
        with loading(where, "model.base.name_or_path"):
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
    if spec.activation_offloading:
        from lit_ft.models.offload import install

        install(model)
    if spec.gradient_checkpointing:
        from transformers import PreTrainedModel

        kwargs = {"use_reentrant": False}  # (the checkpointing function is replaced below)
        successor = getattr(PreTrainedModel, "activation_checkpointing_enable", None)  # transformers' newer name
        if successor is not None and getattr(type(model), "activation_checkpointing_enable", None) is successor:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # older transformers, or a model class of its own making
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        for module in model.modules():  # every block transformers checkpoints goes through `checkpoint_layer`
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = checkpoint_layer
        model.config.use_cache = False
        if spec.checkpoint_every > 1:
            checkpoint_every_kth(model, spec.checkpoint_every)
    return model


def checkpoint_layer(function, *args):
    """Run one checkpointed block (`function(*args)`, transformers' `partial(forward, layer, **kwargs)`) keeping only
    its inputs, and recompute it in backward.

    Reentrant checkpointing (`use_reentrant=True`) where it is exact: its first forward builds no autograd graph and
    runs no saved-tensor hooks, which takes about a third off the host work of a checkpointed step (BENCHMARKS.md,
    "Reentrant checkpointing"), and a small model's step is host work. It passes gradients only through positional
    tensors, so the block runs non-reentrant (exact for any input, torch's saved-tensor hooks) when no positional
    input requires grad (the first layer's input, from the frozen embedding: the LoRA weights inside would get no
    gradient), when an input bound in the partial (a keyword) does (reentrant checkpointing does not track it: a
    leaf gets its gradient, a tensor also used outside the block fails the backward) and under any process group
    (DDP's and FSDP's gradient hooks: reentrant checkpointing breaks DDP's `find_unused_parameters`, even on one
    process). Compiled layers do not come here (`compile_decoder_layers`): under reentrant checkpointing the first
    forward runs without grad, a second set of graphs to compile.
    """
    bound = (*function.args, *function.keywords.values()) if isinstance(function, functools.partial) else ()
    reentrant = any(map(_holds_grad, args)) and not any(map(_holds_grad, bound)) and not _distributed()
    return checkpoint(function, *args, use_reentrant=reentrant)


def _holds_grad(x) -> bool:
    """Whether `x` (a tensor, or tuples, lists and dicts of them) holds a tensor that requires grad, whatever the
    grad mode (the checkpoint runs under the caller's)."""
    if isinstance(x, (tuple, list)):
        return any(map(_holds_grad, x))
    if isinstance(x, dict):
        return any(map(_holds_grad, x.values()))
    return isinstance(x, torch.Tensor) and x.requires_grad


def _distributed() -> bool:
    """A process group is up (DDP, FSDP, DeepSpeed: their gradient hooks), whatever its size."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def checkpoint_every_kth(model, k: int) -> None:
    """Keep checkpointing on decoder layers 0, k, 2k, ... only (`families.decoder_layers`: `layers`, GPT-2's `h`,
    ...; transformers' `GradientCheckpointingLayer` reads its own `gradient_checkpointing` flag); a family whose
    layers are not such layers is refused."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    _, layers = families.decoder_layers(model)
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise ConfigError(f"model.base.checkpoint_every={k}: {type(model).__name__}'s decoder layers cannot be "
                          "checkpointed one by one; use checkpoint_every 1")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % k == 0


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


def compile_decoder_layers(model, backend: str = "inductor", mode: str | None = None,
                           eager_on_error: bool = False) -> int:
    """`torch.compile` each decoder layer in place (the blocks repeat, so one compiled graph serves them all).

    Layers, not the whole model: the embedding, mask construction and lit_ft's chunked loss stay eager, graphs stay
    small (fast compiles) and gradient checkpointing still wraps each compiled layer. Inductor fuses the
    element-wise work (RMSNorm's float32 round trip, RoPE, SwiGLU, LoRA dropout and adds) and its min-cut
    partitioner recomputes cheap element-wise results in backward instead of saving them. Returns the number of
    layers compiled. `mode`: torch.compile's (None: its default). `eager_on_error`: a layer that fails to compile
    runs eagerly, with torch's warning (`torch._dynamo.config.suppress_errors`, for the process): what the memory
    plan asks when it turned compiling on itself, so that its choice never stops a run that would run eagerly.
    """
    layers = _layers_to_compile(model, eager_on_error)
    for layer in layers:
        layer.compile(backend=backend, mode=mode)
    return len(layers)


def _layers_to_compile(model, eager_on_error: bool):
    """The decoder's repeated blocks (`layers`, GPT-2's and Bloom's `h`, ...); `eager_on_error`: from now on a layer
    that fails to compile runs eagerly, for the whole process (`torch._dynamo.config.suppress_errors`)."""
    if eager_on_error:
        torch._dynamo.config.suppress_errors = True
    try:
        layers = families.decoder_layers(model)[1]
    except ConfigError as e:
        raise ConfigError(f"compile: {e}") from e
    for layer in layers:  # compiled layers checkpoint non-reentrant (`checkpoint_layer`)
        if hasattr(layer, "_gradient_checkpointing_func"):
            layer._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    return layers


def compile_gradient_passes(model, backend="inductor", eager_on_error: bool = False) -> int:
    """Each decoder layer through `torch.compile` in the passes that build a graph for backward only (the online
    stages' update: `torch.is_grad_enabled()`); every no-grad pass (rollouts, the decode engine's captured step,
    scoring, the reference's and the old policy's log-probs, validation) runs the layers eagerly, so the decode
    engine captures its own eager step and the compiled graphs are only the update's. One graph serves every layer
    (the first layer's input, from the frozen embedding, needs no grad: a second), for each role's adapter (PEFT's
    active adapter is guarded on); shapes are dynamic from the start, so rollouts of other lengths do not
    recompile. Non-reentrant checkpointing recomputes under grad: the recompute is compiled too. Returns the number
    of layers. `eager_on_error`: as `compile_decoder_layers`' (the memory plan's own choice never stops a run; set
    for the whole process)."""
    layers = _layers_to_compile(model, eager_on_error)
    for layer in layers:
        if not isinstance(layer.__dict__.get("forward"), GradCompiled):  # once, however often it is asked
            layer.forward = GradCompiled(layer, backend, layer.__dict__.get("forward"))
    return len(layers)


class GradCompiled:
    """A decoder layer's `forward` (`compile_gradient_passes`): compiled while grad is enabled, eager otherwise.
    `forward`: a forward the instance already had (a hook's, e.g. accelerate's), else the class's. Copies and
    pickles with its layer (a copy compiles afresh, for the copy's weights)."""

    def __init__(self, layer, backend="inductor", forward=None):
        self.layer, self.backend, self.forward, self._compiled = layer, backend, forward, None

    def __call__(self, *args, **kwargs):
        forward = self.forward if self.forward is not None else types.MethodType(type(self.layer).forward, self.layer)
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(forward, backend=self.backend, dynamic=True)
        return self._compiled(*args, **kwargs)

    def __reduce__(self):
        return type(self), (self.layer, self.backend, self.forward)

    def __deepcopy__(self, memo):
        return type(self)(copy.deepcopy(self.layer, memo), self.backend, copy.deepcopy(self.forward, memo))
