"""Memory-aware language-model losses and the Bradley-Terry reward-model loss.

Pure functions over tensors (imports torch only). The causal-LM loss never materialises the full
``[N, V]`` fp32 logits: rows are processed in chunks, and each chunk runs under non-reentrant activation
checkpointing so the backward pass recomputes that chunk's logits instead of keeping all of them alive
(the same idea as the "chunked cross-entropy" / "cut cross-entropy" tricks used by large-vocabulary trainers).
When the head is frozen (LoRA) the chunks' input gradients are computed in the forward pass instead, so nothing
is recomputed (`_HeadLossWithGrad`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "LogitTransform",
    "causal_lm_loss",
    "selective_log_softmax",
    "entropy_from_logits",
    "bradley_terry_loss",
]


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs; fp64 stays fp64 (so double-precision tests stay exact)."""
    return torch.promote_types(dtype, torch.float32)


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunked_rows(
    fn: Callable[..., Tensor], x: Tensor, *others: Tensor, chunk_size: int, shared: tuple[Tensor, ...] = ()
) -> list[Tensor]:
    """Apply ``fn(x_chunk, *other_chunks, *shared)`` to row chunks of ``x`` (and same-length ``others``).

    Under autograd each chunk is wrapped in non-reentrant ``torch.utils.checkpoint``: only the chunk's inputs
    are kept and its large intermediates (logits, log-probs) are recomputed one chunk at a time in backward.
    ``torch.split`` (not slicing) gives a single backward node, so the input gradient is assembled once.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    x_chunks = x.split(chunk_size)
    other_chunks = [o.split(chunk_size) for o in others]
    grad = _needs_grad(x, *others, *shared)
    out = []
    for i, xc in enumerate(x_chunks):
        args = (xc, *(oc[i] for oc in other_chunks), *shared)
        if grad:
            # The chunk functions are deterministic, so saving/restoring RNG state is wasted work.
            out.append(checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(fn(*args))
    return out


@dataclass(frozen=True)
class LogitTransform:
    """What a model applies to ``lm_head(hidden)`` (``lit_ft.models.families.logit_transform`` reads it from the model).

    ``logits * scale``, then ``softcap * tanh(logits / softcap)`` (Gemma 2, Gemma Team 2024), then
    ``/ temperature`` (sampling); computed in fp32 (fp64 stays fp64).
    """

    scale: float = 1.0
    """Multiplier: Cohere's ``logit_scale``, ``1 / logits_scaling`` for Granite."""
    softcap: float | None = None
    """Gemma 2's ``final_logit_softcapping``."""
    temperature: float = 1.0
    """Sampling temperature, applied last (as ``generate`` applies it to the model's logits)."""

    def apply(self, logits: Tensor) -> Tensor:
        x = logits.to(_softmax_dtype(logits.dtype))
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x / self.temperature if self.temperature != 1.0 else x


def causal_lm_loss(
    hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    head_bias: Tensor | None = None,
    transform: LogitTransform | None = None,
    gather: bool = True,
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy computed from final hidden states, chunked over tokens.

    Args:
        hidden: ``[B, T, H]`` decoder final hidden states (after the final norm), any float dtype.
        lm_head_weight: ``[V, H]`` output projection.
        labels: ``[B, T]`` unshifted token ids; position ``t`` predicts ``labels[:, t + 1]``. Positions whose
            shifted label equals ``ignore_index`` are dropped before any logits are computed.
        ignore_index: label value that marks a position as not trained on.
        chunk_size: rows of the gathered ``[N, H]`` hidden states per logits chunk; peak extra memory is
            about ``chunk_size * V`` fp32 values, in forward and in backward.
        head_bias: ``[V]`` bias of the output projection (Phi-1/2, GPT-J), or None.
        transform: what the model applies after its head (scaling, soft-capping); None applies nothing.
        gather: True: only the trained positions reach the head. False: every position does (an ignored one adds
            zero loss and zero gradient), so no shape depends on the labels' values and nothing waits for the GPU:
            what a step replayed from a CUDA graph needs (`lit_ft.train.graphs`).

    Returns:
        ``(loss_sum, n_tokens)``: fp32 (fp64 for fp64 input) scalar sum of token losses, and a long scalar
        token count. Divide outside (e.g. after an all-reduce of ``n_tokens``) to get a mean that weighs every
        token equally.
        With no trainable token the loss is an exact zero still attached to the graph (so DDP and
        ``backward()`` keep working), never NaN.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"expected hidden [B, T, H] and labels [B, T], got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_weight must be [V, {hidden.shape[2]}], got {tuple(lm_head_weight.shape)}")
    shift_labels = labels[:, 1:]
    keep = shift_labels != ignore_index  # [B, T-1]
    n_tokens = keep.sum()
    if gather:
        h = hidden[:, :-1][keep]  # [N, H]: logits are only ever computed for trained positions
        targets = shift_labels[keep]  # [N]
    else:
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B * (T-1), H]
        targets = shift_labels.reshape(-1)
    # Matmul in the activations' dtype (bf16 tensor cores); a differing weight dtype is cast once ([V, H]).
    weight = lm_head_weight if lm_head_weight.dtype == hidden.dtype else lm_head_weight.to(hidden.dtype)
    acc = _softmax_dtype(hidden.dtype)
    if h.shape[0] == 0:
        zero = (hidden.sum() * 0).to(acc)
        if weight.requires_grad:
            zero = zero + (weight.sum() * 0).to(acc)
        return zero, n_tokens

    shared = (weight,) if head_bias is None else (weight, head_bias.to(hidden.dtype))

    def chunk_loss(h_chunk: Tensor, t_chunk: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        logits = h_chunk @ w.t() if b is None else torch.addmm(b, h_chunk, w.t())  # [n, V], one chunk at a time
        logits = logits.to(acc) if transform is None else transform.apply(logits)
        return F.cross_entropy(logits, t_chunk, reduction="sum", ignore_index=ignore_index)

    if torch.is_grad_enabled() and h.requires_grad and not _needs_grad(*shared):
        # Frozen head (LoRA, QLoRA): the input gradient is computed with the loss, chunk by chunk, so backward
        # does not recompute the [n, V] logits (one head matmul in three saved; the "fused linear cross-entropy"
        # of large-vocabulary trainers). Same memory as the checkpointed chunks: one [N, H] tensor is kept.
        return _HeadLossWithGrad.apply(h, targets, chunk_size, chunk_loss, *shared), n_tokens
    parts = _chunked_rows(chunk_loss, h, targets, chunk_size=chunk_size, shared=shared)
    return torch.stack(parts).sum(), n_tokens


class _HeadLossWithGrad(torch.autograd.Function):
    """``sum(chunk_loss(h_chunk, ...))`` whose forward also computes ``d loss / d h`` (each chunk's logits are
    built once, differentiated at once and freed); backward only scales that gradient by the incoming one.
    For heads without trainable parameters (the gradient reaches ``h`` alone)."""

    @staticmethod
    def forward(ctx, h: Tensor, targets: Tensor, chunk_size: int, chunk_loss, *shared: Tensor) -> Tensor:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        grad = torch.empty_like(h)
        total = torch.zeros((), dtype=_softmax_dtype(h.dtype), device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.enable_grad():
                hc = h[rows].detach().requires_grad_(True)
                loss = chunk_loss(hc, targets[rows], *shared)
                (grad[rows],) = torch.autograd.grad(loss, hc)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out.to(grad.dtype), None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)


def selective_log_softmax(logits: Tensor, index: Tensor, chunk_size: int = 1024) -> Tensor:
    """Log-probability of the chosen tokens, ``log_softmax(logits)[..., index]``.

    Args:
        logits: ``[B, T, V]`` (any float dtype).
        index: ``[B, T]`` token ids in ``[0, V)``.
        chunk_size: rows (of the flattened ``B * T``) converted to fp32 at a time, so a bf16 input never
            gets a full ``[B, T, V]`` fp32 copy, in forward or (via checkpointing) in backward.

    Returns:
        ``[B, T]`` fp32 log-probabilities (fp64 for fp64 input).
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(f"index shape {tuple(index.shape)} must equal logits.shape[:-1] {tuple(logits.shape[:-1])}")
    acc = _softmax_dtype(logits.dtype)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_idx = index.reshape(-1, 1).long()

    def chunk_fn(x: Tensor, idx: Tensor) -> Tensor:
        # log p_i = x_i - logsumexp(x), in fp32.
        x = x.to(acc)
        return (x.gather(-1, idx) - torch.logsumexp(x, dim=-1, keepdim=True)).squeeze(-1)

    parts = _chunked_rows(chunk_fn, flat, flat_idx, chunk_size=chunk_size)
    if not parts:
        return flat.new_zeros(index.shape, dtype=acc)
    return torch.cat(parts).reshape(index.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int = 1024) -> Tensor:
    """Entropy of the softmax distribution per position, ``-sum_v p_v log p_v``.

    Args:
        logits: ``[B, T, V]`` (any float dtype).
        chunk_size: rows converted to fp32 at a time (see :func:`selective_log_softmax`).

    Returns:
        ``[B, T]`` fp32 entropies (fp64 for fp64 input).
    """
    acc = _softmax_dtype(logits.dtype)
    flat = logits.reshape(-1, logits.shape[-1])

    def chunk_fn(x: Tensor) -> Tensor:
        logp = torch.log_softmax(x.to(acc), dim=-1)
        return -(logp.exp() * logp).sum(-1)

    parts = _chunked_rows(chunk_fn, flat, chunk_size=chunk_size)
    if not parts:
        return flat.new_zeros(logits.shape[:-1], dtype=acc)
    return torch.cat(parts).reshape(logits.shape[:-1])


def bradley_terry_loss(
    r_chosen: Tensor,
    r_rejected: Tensor,
    margin: Tensor | float | None = None,
    center_coef: float = 0.0,
) -> Tensor:
    """Pairwise reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1).

    ``mean(-log sigmoid(r_chosen - r_rejected - margin)) + center_coef * mean((r_chosen + r_rejected)**2)``.
    The margin term follows Llama 2 (Touvron et al. 2023, eq. 2); the centering term keeps rewards near zero
    mean, which the loss alone leaves undetermined (Eisenstein et al. 2023, "Helping or Herding?").

    Args:
        r_chosen: ``[B]`` scalar rewards of the preferred responses.
        r_rejected: ``[B]`` scalar rewards of the rejected responses.
        margin: optional ``[B]`` tensor or float: how much the chosen reward should exceed the rejected.
        center_coef: weight of the reward-centering penalty (0 disables it).

    Returns:
        fp32 scalar loss.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    rc, rr = r_chosen.float(), r_rejected.float()
    diff = rc - rr
    if margin is not None:
        diff = diff - (margin.float() if isinstance(margin, Tensor) else margin)
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((rc + rr) ** 2).mean()
    return loss
