"""Masked statistics over response tokens, per-token KL estimators and the response mask, for `lit_ft.losses` (PPO)
and `lit_ft.losses.group` (critic-free RL); every name is re-exported by `lit_ft.losses`.

Pure functions over tensors (imports torch only). Per-token tensors are ``[B, T]`` over *response* tokens;
``mask`` is 1 on real response tokens (up to and including EOS) and 0 after. Masks may be bool or float;
they are used as float weights internally. Computations run in fp32 (fp64 stays fp64).

References: Ziegler et al. 2019 (whitening with the unbiased variance), Schulman 2020 ("Approximating KL
divergence", http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """Float view of a tensor or mask: bool/int/half/bf16 -> fp32, fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when ``None``). ``x`` and ``mask`` broadcast together."""
    xm = as_float(x) * as_float(mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero (mask values act as weights).

    An empty mask gives 0 rather than NaN (the denominator is clamped to 1e-8), so a fully masked
    minibatch contributes nothing instead of poisoning the optimizer state.
    """
    m = torch.broadcast_to(as_float(mask), torch.broadcast_shapes(x.shape, mask.shape))
    denom = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / denom.clamp_min(1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked positions (scalar).

    ``unbiased`` applies Bessel's correction ``n / (n - 1)`` with ``n = mask.sum()``, as the reference RLHF code
    does (Ziegler et al. 2019, lm-human-preferences); it needs ``n > 1`` and raises ``ValueError`` otherwise.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((as_float(x) - mean) ** 2, mask)
    if unbiased:
        n = as_float(mask).sum()
        if float(n) <= 1:
            raise ValueError(f"masked_var(unbiased=True) needs more than one masked element, got mask sum {float(n)}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to zero mean / unit variance over masked positions: ``(x - mean) / sqrt(var + 1e-8)``.

    With ``shift_mean=False`` the mean is added back (only the scale changes), as the reference code does for
    rewards (Ziegler et al. 2019). Uses the unbiased variance. A float ``mask`` weights the mean and variance;
    positions where it is 0 are set to 0 and every other position is whitened, never scaled by its weight.
    Shapes: ``x``, ``mask`` ``[B, T]`` -> ``[B, T]``.
    """
    xf = as_float(x)
    mean, var = masked_mean(xf, mask), masked_var(xf, mask)
    whitened = (xf - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, torch.zeros_like(whitened))


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    Schulman 2020, "Approximating KL divergence", with ``log r = ref_logp - logp``:
      * ``k1 = -log r = logp - ref_logp``: unbiased, high variance, can be negative (Ziegler et al. 2019).
      * ``k2 = (log r)^2 / 2``: biased, low variance, non-negative.
      * ``k3 = (r - 1) - log r``: unbiased, low variance, non-negative (``expm1`` keeps it exact near 0).

    Shapes: ``[B, T]``, ``[B, T]`` -> ``[B, T]`` (fp32).
    """
    log_r = as_float(ref_logprobs) - as_float(logprobs)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1', 'k2' or 'k3'")


def first_true_index(mask_bool: Tensor) -> Tensor:
    """Index of the first non-zero entry per row; ``T`` for rows with none. ``[B, T]`` -> ``[B]`` long."""
    m = mask_bool.bool()
    T = m.shape[-1]
    pos = torch.arange(T, device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, T)).min(dim=-1).values


def last_true_index(mask_bool: Tensor) -> Tensor:
    """Index of the last non-zero entry per row; ``-1`` for rows with none. ``[B, T]`` -> ``[B]`` long."""
    m = mask_bool.bool()
    pos = torch.arange(m.shape[-1], device=m.device).expand_as(m)
    return torch.where(m, pos, torch.full_like(pos, -1)).max(dim=-1).values


def response_mask_after_eos(tokens: Tensor, eos_id: int, pad_id: int | None = None) -> Tensor:
    """Mask of real response tokens: everything up to and including the first EOS, 0 after it.

    Rows without an EOS (truncated at the length limit) keep every token. A pad token the policy samples (``pad_id``
    other than ``eos_id``) ends the response just before it, as the sequence length of TRL's PPO does: the pad is no
    response token (the reward is read at the token before it) and nothing after it is, so the mask has no hole (a
    masked-out pad with real tokens after it would give them other positions and context in the training forward
    than they were sampled with). A response that starts with a pad keeps that one token (an episode to score, not
    an empty one). The pads written after an EOS come after it and are masked. When ``pad_id == eos_id`` (SmolLM2
    pads with ``<|im_end|>``) the first pad is the EOS, kept as the reward must see it.
    Shapes: ``tokens [B, T]`` -> mask ``[B, T]`` (bool), ones then zeros in every row, at least one one.
    """
    T = tokens.shape[-1]
    end = first_true_index(tokens == eos_id) + 1  # T + 1 when there is no EOS
    if pad_id is not None and pad_id != eos_id:
        end = torch.minimum(end, first_true_index(tokens == pad_id).clamp(min=1))
    return torch.arange(T, device=tokens.device).expand_as(tokens) < end.unsqueeze(-1)

