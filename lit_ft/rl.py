"""PPO/RLHF tensor math: masked statistics, KL estimators, KL-shaped rewards, GAE, PPO losses, KL controllers.

Pure functions over tensors (imports torch only). Per-token tensors are ``[B, T]`` over *response* tokens;
``mask`` is 1 on real response tokens (up to and including EOS) and 0 after. Masks may be bool or float;
they are used as float weights internally. Computations run in fp32 (fp64 stays fp64).

References: Schulman et al. 2017 (PPO), Schulman et al. 2016 (GAE), Ziegler et al. 2019 ("Fine-Tuning Language
Models from Human Preferences": KL-penalised reward, adaptive KL), Huang et al. 2022 ("The 37 implementation
details of PPO") and Huang et al. 2023 ("The N implementation details of RLHF with PPO"), Schulman 2020
("Approximating KL divergence", http://joschu.net/blog/kl-approx.html).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_estimate",
    "compute_rewards",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ratio_guard",
    "FixedKLController",
    "AdaptiveKLController",
    "kl_controller",
    "first_true_index",
    "last_true_index",
    "response_mask_after_eos",
    "group_advantages",
    "zero_std_groups",
    "aggregate_loss",
    "clipped_policy_loss",
    "overlong_penalty",
]


def _f(x: Tensor) -> Tensor:
    """Float view of a tensor or mask: bool/int/half/bf16 -> fp32, fp64 kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all elements when ``None``). ``x`` and ``mask`` broadcast together."""
    xm = _f(x) * _f(mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is non-zero (mask values act as weights).

    An empty mask gives 0 rather than NaN (the denominator is clamped to 1e-8), so a fully masked
    minibatch contributes nothing instead of poisoning the optimizer state.
    """
    m = torch.broadcast_to(_f(mask), torch.broadcast_shapes(x.shape, mask.shape))
    denom = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / denom.clamp_min(1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked positions (scalar).

    ``unbiased`` applies Bessel's correction ``n / (n - 1)`` with ``n = mask.sum()``, as the reference RLHF code
    does (Ziegler et al. 2019, lm-human-preferences); it needs ``n > 1`` and raises ``ValueError`` otherwise.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((_f(x) - mean) ** 2, mask)
    if unbiased:
        n = _f(mask).sum()
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
    xf = _f(x)
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
    log_r = _f(ref_logprobs) - _f(logprobs)
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

    Rows without an EOS (truncated at the length limit) keep every token, except that when ``pad_id`` differs
    from ``eos_id`` pad tokens are never real tokens and are masked out. When ``pad_id == eos_id`` (SmolLM2 pads
    with ``<|im_end|>``) the first pad is the EOS and is kept, as the reward must see it.
    Shapes: ``tokens [B, T]`` -> mask ``[B, T]`` (bool).
    """
    T = tokens.shape[-1]
    first_eos = first_true_index(tokens == eos_id)  # T when there is no EOS
    pos = torch.arange(T, device=tokens.device).expand_as(tokens)
    mask = pos <= first_eos.unsqueeze(-1)
    if pad_id is not None and pad_id != eos_id:
        mask = mask & (tokens != pad_id)
    return mask


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """KL-penalised per-token rewards (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020).

    ``rewards_t = -kl_coef * kl_t * mask_t``, plus the sequence score added at the last masked position of each
    row (the EOS token, or the last token of a truncated response).

    Args:
        scores: ``[B]`` reward-model scores.
        logprobs, ref_logprobs: ``[B, T]`` log-probs of the response tokens under the policy / reference.
        mask: ``[B, T]`` response mask; every row needs at least one masked token (else ``ValueError``).
        kl_coef: KL penalty coefficient (beta).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`kl_estimate`).

    Returns:
        ``(rewards, kl)``, both ``[B, T]`` fp32, zero outside the mask.
    """
    m = _f(mask)
    last = last_true_index(mask)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"compute_rewards: rows {rows} have an all-zero response mask (no token to score)")
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * m
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] = rewards[rows, last] + _f(scores).to(rewards.dtype)
    return rewards, kl


def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), backwards over tokens.

    With ``m_T = 0`` and ``V`` outside the mask ignored::

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = m_t * (delta_t + gamma * lam * m_{t+1} * A_{t+1})

    so the value after the final masked token is 0 (the episode ends at EOS) and tokens after it contribute
    nothing. The mask is expected to be a prefix per row (1s then 0s); a hole would end the episode there.
    Shapes: ``[B, T]`` each -> ``(advantages, returns)`` ``[B, T]``, ``returns = advantages + values``
    (Huang et al. 2022: value targets are the lambda-returns).
    """
    v, r, m = _f(values), _f(rewards), _f(mask)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(B, dtype=r.dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    next_mask = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_mask * next_value - v[:, t]
        next_adv = m[:, t] * (delta + gamma * lam * next_mask * next_adv)
        adv[:, t] = next_adv
        next_value, next_mask = v[:, t], m[:, t]
    return adv, adv + v


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7), as a masked token mean.

    ``pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with
    ``ratio = exp(logprobs - old_logprobs)``. Stats (detached scalars): ``clipfrac`` (share of tokens where the
    clipped term is the larger), ``approxkl`` (``0.5 * mean((logprobs - old_logprobs)^2)``, Huang et al. 2022
    detail 12), ``ratio_mean``, ``ratio_max``.
    Shapes: all ``[B, T]`` -> scalar loss.
    """
    log_ratio = _f(logprobs) - _f(old_logprobs)
    ratio = torch.exp(log_ratio)
    adv = _f(advantages)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses2), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses2 > pg_losses).float(), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            # ratio > 0, so filling unmasked tokens with 0 leaves the max of masked ones (0 if none).
            "ratio_max": torch.where(mask.bool(), ratio, torch.zeros_like(ratio)).max(),
        }
    return pg_loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss (Huang et al. 2022 detail 9; Ziegler et al. 2019 reference code).

    ``vf_loss = 0.5 * masked_mean(max((v - R)^2, (clip(v, old - c, old + c) - R)^2))``.
    Stats: ``vf_clipfrac`` (share of tokens where the clipped term is the larger), detached.
    Shapes: all ``[B, T]`` -> scalar loss.
    """
    v, old, ret = _f(values), _f(old_values), _f(returns)
    v_clipped = old + torch.clamp(v - old, -cliprange_value, cliprange_value)
    vf_losses = (v - ret) ** 2
    vf_losses2 = (v_clipped - ret) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_losses2 > vf_losses).float(), mask)
    return vf_loss, {"vf_clipfrac": vf_clipfrac.detach()}


@torch.no_grad()
def ratio_guard(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, threshold: float) -> bool:
    """True when the masked mean importance ratio exceeds ``threshold``: the policy has drifted so far from the
    rollout policy that the update is unreliable and the minibatch should be skipped (TRL's ``ratio_threshold``).
    Shapes: ``[B, T]`` each.
    """
    ratio = torch.exp(_f(logprobs) - _f(old_logprobs))
    return bool(masked_mean(ratio, mask) > threshold)


class FixedKLController:
    """Constant KL coefficient (Ziegler et al. 2019, the non-adaptive setting)."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, section 2.2), a proportional controller on log(beta):

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta * (1 + e * n_steps / horizon)``.
    ``n_steps`` is the number of samples (episodes) since the last update, ``horizon`` its time constant.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


def kl_controller(
    adaptive: bool, init_kl_coef: float, target: float | None = None, horizon: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """Build an :class:`AdaptiveKLController` (needs ``target`` and ``horizon``) or a :class:`FixedKLController`."""
    if adaptive:
        if target is None or horizon is None:
            raise ValueError("an adaptive KL controller needs both target and horizon")
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)


def kl_looks_wrong(mean_seq_kl: float, tolerance: float = 0.1) -> bool:
    """True when the batch-mean sequence KL is clearly negative.

    Sampled from the policy itself, the k1 estimate averages to KL(policy || ref) >= 0; a clearly negative mean
    means the responses were not sampled from the distribution whose log-probs are used (top-k/top-p filtering,
    a temperature not applied to the log-probs, or a reference that is not the policy's start).
    """
    return float(mean_seq_kl) < -abs(tolerance)


# ---------------------------------------------------------------------------------------------- critic-free RL
# GRPO (Shao et al. 2024, DeepSeekMath), Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"), RLOO
# (Ahmadian et al. 2024, "Back to Basics"), REINFORCE++ (Hu 2025), DAPO (Yu et al. 2025). Sequence scores are
# ``[B]`` with the ``k`` samples of one prompt side by side (rows ``g*k .. g*k+k-1`` form group ``g``).

ADVANTAGE_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp")
GRPO_STD_EPS = 1e-4  # added to the group std (TRL's GRPOTrainer; DeepSeekMath's reference code uses 1e-4 too)


def _groups(scores: Tensor, k: int) -> Tensor:
    if k < 1 or scores.dim() != 1 or scores.numel() % k:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of k={k}")
    return _f(scores).view(-1, k)


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
        x = _f(scores)
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
    adv = _f(advantages)
    if adv.dim() == 1:
        adv = adv[:, None]
    keep = mask.bool()  # after EOS every log-prob is 0: no exp() of a pad token's log-prob can overflow there
    logprobs, old_logprobs = torch.where(keep, _f(logprobs), 0.0), torch.where(keep, _f(old_logprobs), 0.0)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1.0 - cliprange_low, 1.0 + cliprange_high)
    token_losses = torch.maximum(-adv * ratio, -adv * clipped)
    stats: dict[str, Tensor] = {}
    if ref_logprobs is not None:
        kl = kl_estimate(logprobs, torch.where(keep, _f(ref_logprobs), 0.0), "k3")
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
    over = (_f(lengths) - (max_len - buffer)).clamp(min=0, max=buffer)
    return -factor * over / buffer
