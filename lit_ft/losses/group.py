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
                        beta: float = 0.0, level: str = "token", policy_loss: str = "clip",
                        cispo_ratio_max: float = 5.0, cispo_ratio_min: float | None = None,
                        token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The policy loss of the critic-free stages with a sequence advantage and an optional KL term.

    ``ratio = exp(logprobs - old_logprobs)`` per token; with ``level="sequence"`` (GSPO, Zheng et al. 2025) every
    token of a response carries its length-normalised sequence ratio ``exp(mean_t(logprobs - old_logprobs))``
    instead (with ``aggregation="sequence_mean"`` that is the paper's objective exactly; TRL's
    ``importance_sampling_level="sequence"`` broadcasts it the same way).

    ``policy_loss="clip"``, per token: ``max(-A * ratio, -A * clip(ratio, 1 - cliprange_low, 1 + cliprange_high))``
    (PPO's surrogate; GRPO, Shao et al. 2024, eq. 4; ``cliprange_high > cliprange_low`` is DAPO's clip-higher).
    ``policy_loss="cispo"`` (MiniMax-M1, 2025): ``-sg(clip(ratio, cispo_ratio_min, cispo_ratio_max)) * A *
    logprobs``: a REINFORCE loss weighted by the clipped, detached importance ratio, so no token's gradient is ever
    cut off, only its weight bounded. ``token_weights`` (``[B, T]``, detached; e.g. the rollout correction of
    `lit_ft.losses.rollout_correction`) multiply this policy term per token. Then ``+ beta * k3`` with ``k3`` the KL
    estimate to the reference (Schulman 2020), reduced by :func:`aggregate_loss`. Stats (detached token means, TRL's
    names): ``clip_ratio/low_mean`` (ratio below ``1 - low`` with ``A < 0``; cispo: below its minimum),
    ``clip_ratio/high_mean`` (above ``1 + high`` with ``A > 0``; cispo: above its maximum), ``clip_ratio/region_mean``
    (either), ``kl`` (mean k3, with a reference). Shapes: ``logprobs``, ``old_logprobs``, ``mask`` ``[B, T]``;
    ``advantages`` ``[B]`` or ``[B, T]``; ``ref_logprobs`` and ``token_weights`` ``[B, T]`` or None -> scalar loss.
    """
    adv = as_float(advantages)
    if adv.dim() == 1:
        adv = adv[:, None]
    keep = mask.bool()  # after EOS every log-prob is 0: no exp() of a pad token's log-prob can overflow there
    logprobs, old_logprobs = torch.where(keep, as_float(logprobs), 0.0), torch.where(keep, as_float(old_logprobs), 0.0)
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        log_ratio = (masked_sum(log_ratio, mask, dim=1) / mask.sum(1).clamp(min=1))[:, None].expand_as(logprobs)
    elif level != "token":
        raise ValueError(f"unknown importance sampling level {level!r}; expected token or sequence")
    ratio = torch.exp(log_ratio)
    if policy_loss == "clip":
        clipped = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
        token_losses = torch.maximum(-adv * ratio, -adv * clipped)
        low_bound, high_bound = 1.0 - cliprange_low, 1.0 + cliprange_high
    elif policy_loss == "cispo":
        weight = torch.clamp(ratio, min=cispo_ratio_min, max=cispo_ratio_max).detach()
        token_losses = -weight * adv * logprobs
        low_bound, high_bound = cispo_ratio_min if cispo_ratio_min is not None else 0.0, cispo_ratio_max
    else:
        raise ValueError(f"unknown policy loss {policy_loss!r}; expected clip or cispo")
    if token_weights is not None:
        token_losses = token_losses * as_float(token_weights).detach()
    stats: dict[str, Tensor] = {}
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, torch.where(keep, as_float(ref_logprobs), 0.0), "k3")
        if beta:
            token_losses = token_losses + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    loss = aggregate_loss(token_losses, mask, aggregation, max_len)
    with torch.no_grad():
        low = (ratio < low_bound) & (adv < 0) if policy_loss == "clip" else ratio < low_bound
        high = (ratio > high_bound) & (adv > 0) if policy_loss == "clip" else ratio > high_bound
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
