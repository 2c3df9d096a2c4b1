"""What the user says about the model: `ModelSpec` (which base weights and how to hold them) and `LoraSpec` (how to
adapt them). Plain dataclasses that check themselves (`lit_ft.validation`); every layer above builds from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lit_ft.errors import ConfigError
from lit_ft.models.default import DEFAULT_MODEL_NAME
from lit_ft.models.identity import local_weights_path, weights_fingerprint
from lit_ft.validation import check_spec


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Llama's projection names (the explicit list for Llama-style models; the default `all` finds them itself)."""


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
    init: Literal["default", "gaussian", "pissa", "olora", "loftq"] = "default"
    """How a new adapter starts. `default`: A Kaiming-uniform, B zero, so the adapter starts as a no-op (Hu et al.
    2021); `gaussian`: A Gaussian, B zero. `pissa` (Meng et al. 2024) and `olora` (Buyukakyuz 2024) start A and B
    from each adapted weight's top-r singular vectors (a QR decomposition for OLoRA) and leave the base the residual
    W - s*B0*A0, so the model is unchanged at step 0 but the adapter trains the principal directions: SFT and reward
    stages only, a non-quantized base, no DoRA; the export is converted to an ordinary LoRA of rank 2r on the
    unchanged base (what PEFT's conversion writes). `loftq` (Li et al. 2023) fits A and B to the 4-bit quantization
    error of each weight (`model.base.quantization` nf4/fp4, the base's weights as safetensors on disk): the
    adapter then belongs to the quantized base it corrects. The DPO, PPO and GRPO stages compare the policy with the
    base without the adapter, so they start from `default` or an exported adapter."""
    init_svd_iters: int = 16
    """`pissa` and `loftq`: subspace iterations of the fast randomized SVD (PEFT's `pissa_niter_N`, minutes faster
    on large models); 0 = the exact SVD."""
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
    """Recompute activations in the backward pass (each layer's inputs kept; reentrant where that is exact, else
    non-reentrant, so frozen inputs keep LoRA trainable: `lit_ft.models.checkpoint_layer`)."""
    checkpoint_every: int = 1
    """With `gradient_checkpointing`: checkpoint every k-th decoder layer (layers 0, k, 2k, ...), the others keep
    their activations. 1 = every layer; 2 halves the recompute for about half the saving (`lit-ft plan` shows
    both; `--memory auto` tries 4, then 2, then 1)."""
    activation_offloading: bool = False
    """Move the activations a training forward saves to pinned host memory and back for the backward, on a side
    stream (`lit_ft.models.offload`; CUDA only, a no-op elsewhere): the GPU holds about two layers' activations
    instead of all of them, for host memory and PCIe time. Composes with `gradient_checkpointing` (then only each
    layer's input moves)."""
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
        a fingerprint of the weights themselves (`identity.weights_fingerprint`; None for a hub id that is not in
        the local cache)."""
        return {
            "name_or_path": self.name_or_path or DEFAULT_MODEL_NAME,
            "revision": self.revision,
            "quantization": self.quantization,
            "weights": weights_fingerprint(local_weights_path(self.name_or_path, self.revision)),
        }
