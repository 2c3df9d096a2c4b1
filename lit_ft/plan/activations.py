"""Activation memory of a decoder-only transformer with LoRA on a frozen base: what autograd saves, term by term.

Pure arithmetic over the config's shapes (no torch model). The terms are those of a Llama-style layer
(RMSNorm, grouped-query attention with RoPE, SwiGLU MLP) as transformers implements it, with Phi-3's fused
`qkv_proj`/`gate_up_proj` (`Dims.fused_qkv`), and were derived from the tensors autograd saves for one forward
(`tests/test_plan.py` checks the sums byte for byte against `torch.autograd.graph.saved_tensors_hooks` on the CPU).
Other layer layouts (Falcon's parallel attention and GELU MLP, GPT-2's Conv1D) are planned with these terms as an
approximation: their LoRA inputs under other projection names are not counted. Notation: ``n`` tokens in the batch (rows x length),
``a`` bytes per activation element (2 under bf16, 4 in fp32), H hidden, I intermediate, h/k query/KV heads, d
head dim, r LoRA rank, V vocabulary.

Why a frozen base saves so little: ``y = x W^T`` needs ``x`` only for the gradient of ``W``. With ``W`` frozen
(plain, 4-bit or 8-bit) only ``W`` is kept, and it is already counted as a weight; what is saved are the inputs of
the trainable LoRA matrices and of the non-linear and attention ops on the path of the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

# Projections by the input they read (Phi-3 fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj`).
QKV, O, GATE_UP, DOWN = ("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj",
                                                                                   "gate_up_proj"), ("down_proj",)


@dataclass(frozen=True)
class Dims:
    """The shapes of a decoder-only config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    attn: str = "sdpa"
    """The attention kernel a load picks (`model.base.attn_implementation`, resolved for `auto`)."""
    logit_softcap: bool = False
    """The logits are soft-capped after the head (Gemma 2's `final_logit_softcapping`): tanh keeps its output."""
    fused_qkv: bool = False
    """A Phi-3-style layer: q, k and v come from one fused `qkv_proj` (v is a view of its output) and RoPE
    concatenates its rotated part (partial rotary), so q and the attention output are laid out [rows, h, seq, d]
    and `o_proj` reads a transposed copy of that output, not the tensor sdpa keeps."""
    window: int | None = None
    """The sliding window of its sliding-attention layers (None: none slide): the decode engine serves the model
    only where the window covers the rollout's prompt + new tokens."""

    @classmethod
    def from_config(cls, config) -> "Dims":
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        softcap = bool(getattr(config, "final_logit_softcapping", None) or getattr(text, "final_logit_softcapping", None))
        # Falcon names its MLP width `ffn_hidden_size` (None: 4 x hidden, its non-gated GELU MLP)
        inter = getattr(text, "intermediate_size", None) or getattr(text, "ffn_hidden_size", None) or 4 * text.hidden_size
        return cls(text.num_hidden_layers, text.hidden_size, inter, heads,
                   getattr(text, "num_key_value_heads", None) or heads, head_dim, text.vocab_size,
                   logit_softcap=softcap)


@dataclass(frozen=True)
class LoraShape:
    """Which projections carry a LoRA of rank r, whether its input dropout is on, and in what dtype it runs."""

    targets: frozenset
    r: int
    dropout: bool
    nbytes: int | None = None
    """Bytes per element of what the LoRA path saves: PEFT keeps adapters in fp32 under a half base (its
    `autocast_adapter_dtype`) and casts the input up (4); Lightning's `*-true` casts them to half (2); under
    `*-mixed` autocast runs the LoRA matmuls in half (2). None: the activation dtype."""
    copies: bool = False
    """Each projection works on its own cast copy of the input (dtype differs, or autocast), so projections
    sharing an input share nothing."""


def layer_saved(d: Dims, n: int, a: int, lora: LoraShape | None, grad_in: bool, attn: str = "sdpa",
                rows: int = 1, seq: int = 1, mask_bytes: int | None = None, masked: bool = False,
                compiled: bool = False, mask_copy: bool = True) -> dict[str, int]:
    """Bytes autograd keeps for the backward of ONE decoder layer over n = rows x seq tokens, by term.

    `grad_in`: the layer's input requires grad (false only for the first layer, whose input is the frozen
    embedding). `mask_bytes`: bytes per element of a LoRA dropout mask (CUDA's fused dropout keeps a bool mask:
    1; None: the CPU keeps a mask in the dtype the dropout runs in). `masked`: rows carry padding or are packed,
    so transformers passes sdpa a 4-D mask; `mask_copy`: sdpa turns it into an additive mask of its own in every
    layer (transformers' boolean mask; lit_ft's shared-prompt mask is additive and aligned already: no copy).

    `compiled`: the layer runs through `torch.compile` (`compile: true`; inductor). AOTAutograd's min-cut
    partitioner (`min_cut_rematerialization_partition`) saves the cheapest set of tensors from which the backward
    can recompute the rest, and element-wise ops are cheap to recompute: RMSNorm keeps its input in the activation
    dtype and recomputes the fp32 cast (n x H x a instead of n x H x 4), SwiGLU keeps gate's and up's outputs and
    recomputes silu (2 instead of 3 x [n, I]), and dropout, decomposed to a comparison of random numbers, keeps a
    bool mask on every device (1 byte). Matmul inputs (the dropped LoRA inputs among them: the random mask is
    never recomputed, and the product is no cheaper to keep than its inputs) and sdpa's own saved set are as in
    eager. `tests/test_plan.py` checks this byte for byte against the same partitioner on the CPU
    (the `aot_eager_decomp_partition` backend: inductor's decompositions and partitioner without its code
    generation); the H200's measured peaks agree (BENCHMARKS.md, "Memory plan against the measured peaks").
    """
    H, I, h, k, dh = d.hidden, d.intermediate, d.heads, d.kv_heads, d.head_dim
    t = lora.targets if lora else frozenset()
    if compiled:
        mask_bytes = 1
    m = 0 if mask_bytes is None else mask_bytes  # 0: the dtype the dropout runs in (the LoRA path's)
    out: dict[str, int] = {}
    # Gradient flow through the layer: an op saves its inputs only when its output needs a gradient.
    g_qkv = grad_in or bool(t & set(QKV))
    g_o = g_qkv or "o_proj" in t
    g_mlp = g_o or bool(t & set(GATE_UP))
    # RMSNorm (x * rsqrt(mean(x^2) + eps), in fp32): its fp32 input [n, H] and the rsqrt [n, 1]. The input norm
    # needs them only when the input needs a gradient; the post-attention norm when attention does.
    norm = n * H * (a if compiled else 4) + n * 4
    out["norms"] = norm * (int(grad_in) + int(g_o))
    # Attention. sdpa/flash kernels keep q [n, h*d], k and v [n, k*d] (grouped-query: not repeated), the output
    # [n, h*d] and the fp32 log-sum-exp [n, h]; RoPE's q*cos and k*cos keep only cos/sin (counted once per model).
    if g_qkv:
        if attn == "eager":
            # Eager keeps q, the KV heads repeated to h, the fp32 softmax [rows, h, seq, seq] and its cast.
            out["attention"] = 3 * n * h * dh * a + rows * h * seq * seq * (4 + a)
        elif attn == "sdpa" and masked:
            # With a mask, transformers repeats the KV heads to h for sdpa (no GQA kernel takes a mask), and
            # torch turns the bool mask into an additive one in the activation dtype, per call, which the
            # memory-efficient kernel keeps for its backward: [rows, 1, seq, seq] a layer.
            out["attention"] = 4 * n * h * dh * a + n * h * 4 + (rows * seq * seq * a if mask_copy else 0)
        else:
            # A fused projection's v is a slice of its [n, (h + 2k) d] output (q and k are new tensors after
            # RoPE), so sdpa keeping v keeps that whole output.
            v = n * (h + 2 * k) * dh * a if d.fused_qkv else n * k * dh * a
            out["attention"] = 2 * n * h * dh * a + n * k * dh * a + v + n * h * 4
    # SwiGLU down(silu(gate(x)) * up(x)): silu keeps its input, the product keeps both factors: 3 x [n, I].
    out["mlp"] = (2 if compiled else 3) * n * I * a if g_mlp else 0
    out["lora"] = _lora_saved(d, n, a, t, lora, m, (grad_in, g_qkv, g_o, g_mlp), attn) if lora else 0
    return out


def _lora_saved(d: Dims, n: int, a: int, t, lora: LoraShape, m: int, grads: tuple, attn: str) -> int:
    """Per adapted projection ``B(A(dropout(x)))``: B keeps A's output [n, r]; A keeps its input. With dropout
    each projection has its own dropped copy [n, d_in] and (when x needs a gradient) its mask; without dropout,
    projections that share an input keep that one tensor once (q/k/v the normed input, gate/up the
    post-attention normed input, o the attention output, down the SwiGLU product). o's input is a copy of its own
    under eager attention and in a Phi-3-style layer (`Dims.fused_qkv`); in a Llama layer sdpa's output is laid out
    [rows, seq, h, d] like its query, so the transpose o reads is that very tensor, kept already."""
    H, I = d.hidden, d.intermediate
    a = lora.nbytes or a
    m = m if m != 0 else a
    total = 0
    groups = [(QKV, H), (O, d.heads * d.head_dim), (GATE_UP, H), (DOWN, I)]
    for (names, d_in), x_grad in zip(groups, grads):
        hit = [p for p in names if p in t]
        total += len(hit) * n * lora.r * a  # (the `scaling` factor is a Python float: a scalar, not a tensor)
        if lora.dropout:
            total += len(hit) * n * d_in * (a + (m if x_grad else 0))
        elif hit and lora.copies:
            total += len(hit) * n * d_in * a
        elif hit and (names != O or attn == "eager" or d.fused_qkv):
            total += n * d_in * a
    return total


def rope_saved(d: Dims, pos_rows: int, seq: int, a: int) -> int:
    """cos and sin [pos_rows, 1, seq, d], shared by every layer (pos_rows = 1 unless position ids are given)."""
    return 2 * pos_rows * seq * d.head_dim * a


def attention_mask_bytes(rows: int, seq: int, a: int, attn: str, masked: bool) -> int:
    """Eager attention's additive 4-D mask [rows, 1, seq, seq] in the activation dtype (and lit_ft's shared-prompt
    mask under either attention, `lit_ft.models.shared_prompt`), built once per forward for padded, packed or
    shared-prompt rows and shared by every layer (sdpa's per-layer copy is a layer term; flash attention takes
    the padding as sequence lengths and needs none)."""
    return rows * seq * seq * a if masked and attn == "eager" else 0


def trunk_saved(d: Dims, rows: int, seq: int, a: int, lora: LoraShape | None, checkpointing: bool,
                attn: str = "sdpa", mask_bytes: int | None = None, pos_rows: int = 1, masked: bool = False,
                compiled: bool = False, every: int = 1, mask_copy: bool = True) -> dict:
    """Saved bytes of the whole decoder over [rows, seq] (the layers, RoPE, the final norm, the mask), and the
    extra of recomputing one layer in the backward under gradient checkpointing (of every `every`-th layer:
    layers 0, k, 2k, ..., `models.load.checkpoint_every_kth`). `compiled`: the layers run through torch.compile
    (`layer_saved`; the final norm, outside them, stays eager). `mask_copy` False: one additive mask that every
    layer reads (`lit_ft.models.shared_prompt`), counted once as eager attention's is."""
    n = rows * seq
    first = sum(layer_saved(d, n, a, lora, False, attn, rows, seq, mask_bytes, masked, compiled, mask_copy).values())
    other = sum(layer_saved(d, n, a, lora, True, attn, rows, seq, mask_bytes, masked, compiled, mask_copy).values())
    shared = rope_saved(d, pos_rows, seq, a) + attention_mask_bytes(rows, seq, a, attn if mask_copy else "eager",
                                                                    masked)
    final_norm = n * d.hidden * 4 + n * 4  # the final RMSNorm's fp32 input and rsqrt
    if checkpointing:
        # Checkpointing (reentrant or not) keeps each layer's inputs (the hidden states [n, H]) and nothing inside;
        # the backward re-runs one layer at a time, so one layer's saved set exists again at the peak.
        checkpointed = -(-d.layers // every)  # layer 0 is one of them: the others save as any later layer
        kept = checkpointed * n * d.hidden * a + (d.layers - checkpointed) * other
        return {"layers": kept + shared + final_norm, "recompute": other}
    return {"layers": first + (d.layers - 1) * other + shared + final_norm, "recompute": 0}


def loss_saved(n_loss: int, rows: int, seq: int, hidden: int, a: int) -> int:
    """`losses.causal_lm_loss` keeps the [rows, seq-1] boolean keep-mask of its gather and one [N, H] tensor in the
    activations' dtype: for a frozen head (LoRA, QLoRA) `_HeadLossWithGrad` keeps the hidden-state gradient it
    computed with the loss, chunk by chunk (each chunk's logits and targets are freed inside its forward); the
    targets are not kept. (A trainable head's checkpointed chunks would keep the gathered states and the int64
    targets [N] instead: 8 bytes a token more; no lit_ft stage trains the head under LoRA.)"""
    return rows * (seq - 1) + n_loss * hidden * a


def logp_saved(n_loss: int, rows: int, seq: int, hidden: int, a: int) -> int:
    """`dpo_ref.sequence_logps` keeps the [rows, seq-1] boolean keep-mask of its gather, the gathered hidden states
    [N, H] and the int64 targets [N] (views of both are the inputs its checkpointed chunks recompute from) and the
    int64 sequence index [N] of its `index_add` (kept for that op's backward)."""
    return rows * (seq - 1) + n_loss * hidden * a + 2 * n_loss * 8


def loss_transient(n_loss: int, chunk: int, vocab: int, a: int) -> int:
    """One chunk of the chunked loss, differentiated within the forward for a frozen head (SFT's
    `_HeadLossWithGrad`) or recomputed in the backward (DPO's checkpointed log-prob chunks): the logits in the
    activation dtype and in fp32, the fp32 log-softmax (or logsumexp input) kept for the gradient, and the fp32
    gradients of both: c x V x (a + 3 x 4)."""
    c = min(chunk, n_loss)
    return c * vocab * (a + 12)


def fused_loss_transient(n_loss: int, chunk: int, vocab: int) -> int:
    """One chunk of SFT's loss for a frozen head (`losses._HeadLossWithGrad`), differentiated inside the forward:
    the activation-dtype logits are freed at their fp32 cast and the cast after log-softmax (only its output is
    kept), so the most alive at once is in the backward of log-softmax: its fp32 output, the incoming gradient and
    the outgoing one, c x V x 3 x 4 (the half-precision gradient after them is smaller: fp32 + half)."""
    return min(chunk, n_loss) * vocab * 12


def backward_working(d: Dims, n: int, a: int) -> int:
    """Gradient buffers alive while one layer back-propagates: the incoming and outgoing gradient of the hidden
    states [n, H] and the gradients of the two MLP factors [n, I] (an allowance, not an exact count)."""
    return 2 * n * d.hidden * a + 2 * n * d.intermediate * a


def nograd_forward(d: Dims, n: int, a: int) -> int:
    """Peak of one layer's forward without autograd (rollout scoring, log-prob passes): the residual and normed
    hidden states, q/k/v/attention output, and the MLP's gate, up and product."""
    return n * (2 * d.hidden + 2 * d.heads * d.head_dim + 2 * d.kv_heads * d.head_dim + 3 * d.intermediate) * a


def kv_cache(d: Dims, rows: int, positions: int, a: int) -> int:
    """Keys and values of every layer for rows x positions tokens: 2 x layers x k x d per token."""
    return 2 * d.layers * d.kv_heads * d.head_dim * rows * positions * a
