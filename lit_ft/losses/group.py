"""Critic-free RL tensor math: group advantages, loss aggregation, the clipped surrogate with a sequence advantage,
DAPO's overlong penalty; every name is re-exported by `lit_ft.losses`.

Pure functions over tensors (imports torch only), with the conventions of `lit_ft.losses.masked`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_ft.losses.masked import as_float, kl_estimate, masked_mean, masked_sum

# ---------------------------------------------------------------------------------------------- critic-free RL
# GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), RLOO
# (Ahmadian et al. 2024, "Back to Basics"), REINFORCE++ (Hu 2025), DAPO (Yu et al. 2025). Sequence scores are
# ``[B]`` with the ``k`` samples of one prompt side by side (rows ``g*k .. g*k+k-1`` form group ``g``).

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
GRPO_STD_EPS = 1e-4  # added to the group std (TRL's GRPOTrainer; DeepSeekMath's reference code uses 1e-4 too)


def _groups(scores: Tensor, k: int) -> Tensor:
    if k < 1 or scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of k={k}")
    return as_float(scores).view(-1, k)


def group_advantages(scores: Tensor, k: int, estimator: str, moments: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One advantage per sequence from its sequence score and the scores beside it.

    * ``grpo``: ``(r_i - mean_g) / (std_g + 1e-4)`` over the k samples of a prompt (Shao et al. 2024, eq. for
      outcome supervision; std with Bessel's correction, as TRL).
    * ``dr_grpo``: ``r_i - mean_g``: no division by the std, which up-weights prompts that are nearly always or
      never solved (Liu et al. 2025).
    * ``rloo``: ``r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_g)``, the leave-one-out baseline
      (Kool et al. 2019; Ahmadian et al. 2024); needs ``k >= 2``.
    * ``reinforce_pp``: ``(r_i - mean_B) / (std_B + 1e-8)`` over the whole batch, every rank's when ``moments``
      ``(mean, std)`` of the global batch are given (Hu 2025, REINFORCE++'s global advantage normalisation); any k.

    A group of one sample (k = 1) has no baseline beside it: ``grpo`` and ``dr_grpo`` give 0; a batch of one gives 0
    under ``reinforce_pp``; a group of equal scores gives 0 under every group estimator.
    Shapes: ``scores [B]`` (``B`` a multiple of ``k``) -> ``[B]`` fp32.
    """
    if estimator == "reinforce_pp":
        x = as_float(scores)
        if moments is None:
            n = x.numel()
            moments = (x.mean(), x.std() if n > 1 else torch.zeros((), dtype=x.dtype, device=x.device))
        mean, std = moments
        return (x - mean) / (std + 1e-8)
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; expected one of {ADVANTAGE_ESTIMATORS}")
    g = _groups(scores, k)
    centred = g - g.mean(1, keepdim=True)
    if estimator == "rloo":
        if k < 2:
            raise ValueError("rloo needs at least 2 samples a prompt (the leave-one-out baseline)")
        return (centred * (k / (k - 1))).reshape(-1)
    if estimator == "grpo" and k > 1:
        centred = centred / (g.std(1, keepdim=True) + GRPO_STD_EPS)
    return centred.reshape(-1)


def zero_std_groups(scores: Tensor, k: int) -> Tensor:
    """Groups whose k scores are all equal (no learning signal under a group baseline; DAPO's dynamic sampling
    drops them). Shapes: ``scores [B]`` -> ``[B // k]`` bool."""
    g = _groups(scores, k)
    return (g.max(1).values - g.min(1).values) == 0


def aggregate_loss(token_losses: Tensor, mask: Tensor, how: str, max_len: int | None = None) -> Tensor:
    """Reduce per-token losses ``[B, T]`` to a scalar over the masked tokens.

    * ``sequence_mean``: each sequence's token mean, then the mean over sequences (GRPO, Shao et al. 2024): a token
      of a long response weighs less than one of a short response.
    * ``token_mean``: the mean over every token of the batch (DAPO, Yu et al. 2025, "token-level policy gradient").
    * ``constant``: the token sum divided by ``B * max_len``, a constant of the run (Dr. GRPO, Liu et al. 2025:
      no length normalisation, so no bias towards long wrong or short right answers).
    """
    if how == "token_mean":
        return masked_mean(token_losses, mask)
    if how == "sequence_mean":
        return masked_mean(token_losses, mask, dim=1).mean()
    if how == "constant":
        if max_len is None or max_len < 1:
            raise ValueError("aggregate_loss('constant') needs max_len >= 1 (the longest response allowed)")
        return masked_sum(token_losses, mask) / (token_losses.shape[0] * max_len)
    raise ValueError(f"unknown loss aggregation {how!r}; expected sequence_mean, token_mean or constant")


def clipped_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                        cliprange_low: float, cliprange_high: float, aggregation: str = "token_mean",
                        max_len: int | None = None, ref_logprobs: Tensor | None = None,
                        beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate with a sequence advantage and an optional KL term (GRPO's objective).

    Per token: ``max(-A * ratio, -A * clip(ratio, 1 - cliprange_low, 1 + cliprange_high)) + beta * k3`` with
    ``ratio = exp(logprobs - old_logprobs)``, ``k3`` the KL estimate to the reference (Schulman 2020; Shao et al.
    2024, eq. 4), reduced by :func:`aggregate_loss`. ``cliprange_high > cliprange_low`` is DAPO's clip-higher: a
    token with ``A > 0`` may gain more probability before its gradient stops. Stats (detached token means, TRL's
    names): ``clip_ratio/low_mean`` (ratio below ``1 - low`` with ``A < 0``), ``clip_ratio/high_mean`` (above
    ``1 + high`` with ``A > 0``), ``clip_ratio/region_mean`` (either), ``kl`` (mean k3, with a reference).
    Shapes: ``logprobs``, ``old_logprobs``, ``mask`` ``[B, T]``; ``advantages`` ``[B]`` or ``[B, T]``;
    ``ref_logprobs`` ``[B, T]`` or None -> scalar loss.
    """
    adv = as_float(advantages)
    if adv.dim() == 1:
        adv = adv[:, None]
    keep = mask.bool()  # after EOS every log-prob is 0: no exp() of a pad token's log-prob can overflow there
    logprobs, old_logprobs = torch.where(keep, as_float(logprobs), 0.0), torch.where(keep, as_float(old_logprobs), 0.0)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    token_losses = torch.maximum(-adv * ratio, -adv * clipped)
    stats: dict[str, Tensor] = {}
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, torch.where(keep, as_float(ref_logprobs), 0.0), "k3")
        if beta:
            token_losses = token_losses + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate_loss(token_losses, mask, aggregation, max_len)
    with torch.no_grad():
        low = (ratio < 1.0 - cliprange_low) & (adv < 0)
        high = (ratio > 1.0 + cliprange_high) & (adv > 0)
        stats.update({"clip_ratio/low_mean": masked_mean(low.float(), mask),
                      "clip_ratio/high_mean": masked_mean(high.float(), mask),
                      "clip_ratio/region_mean": masked_mean((low | high).float(), mask)})
    return loss, {k: v.detach() for k, v in stats.items()}


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to ``max_len - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_len``. Shapes: ``lengths [B]`` -> ``[B]`` fp32 (added to the scores)."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty needs 0 < buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    over = (as_float(lengths) - (max_len - buffer)).clamp(min=0, max=buffer)
    return -factor * over / buffer
