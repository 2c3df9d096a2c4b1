"""PPO/RLHF tensor math: KL-shaped rewards, GAE, PPO losses, KL controllers.

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

from lit_ft.losses.masked import as_float, kl_estimate, last_true_index, masked_mean


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
    m = as_float(mask)
    last = last_true_index(mask)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"compute_rewards: rows {rows} have an all-zero response mask (no token to score)")
    kl = kl_estimate(logprobs, ref_logprobs, estimator) * m
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] = rewards[rows, last] + as_float(scores).to(rewards.dtype)
    return rewards, kl


def gae(values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eqs. 11-16), backwards over the masked tokens.

    With ``V`` outside the mask ignored, over the masked positions t < t' of a row with no masked position between
    them (t' the next one, ``m_{t'} = 0`` after the last)::

        delta_t = r_t + gamma * m_{t'} * V_{t'} - V_t
        A_t     = delta_t + gamma * lam * m_{t'} * A_{t'}

    so the value after the final masked token is 0 (the episode ends at EOS), tokens after it contribute nothing,
    and positions outside the mask INSIDE a row (an environment's turns between the model's: `Rollout.attend`) are
    skipped: the model's next token follows its last one, as if the environment's tokens were not there. A prefix
    mask (one response) is the usual recursion. Shapes: ``[B, T]`` each -> ``(advantages, returns)`` ``[B, T]``,
    0 outside the mask, ``returns = advantages + values`` (Huang et al. 2022: value targets are the lambda-returns).
    """
    v, r, m = as_float(values), as_float(rewards), as_float(mask)
    B, T = r.shape
    adv = torch.zeros_like(r)
    next_value = torch.zeros(B, dtype=r.dtype, device=r.device)
    next_adv = torch.zeros_like(next_value)
    next_mask = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_mask * next_value - v[:, t]
        a = m[:, t] * (delta + gamma * lam * next_mask * next_adv)
        adv[:, t] = a
        kept = m[:, t] > 0  # outside the mask: carried over unchanged to the previous masked token
        next_value = torch.where(kept, v[:, t], next_value)
        next_adv = torch.where(kept, a, next_adv)
        next_mask = torch.where(kept, m[:, t], next_mask)
    return adv, adv + v


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float,
    token_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate policy loss (Schulman et al. 2017, eq. 7), as a masked token mean.

    ``pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with
    ``ratio = exp(logprobs - old_logprobs)``; ``token_weights`` ``[B, T]`` (detached; e.g. the rollout correction of
    `lit_ft.losses.rollout_correction`) multiply each token's term inside the mean (its denominator unchanged).
    Stats (detached scalars): ``clipfrac`` (share of tokens where the clipped term is the larger), ``approxkl``
    (``0.5 * mean((logprobs - old_logprobs)^2)``, Huang et al. 2022 detail 12), ``ratio_mean``, ``ratio_max``.
    Shapes: all ``[B, T]`` -> scalar loss.
    """
    log_ratio = as_float(logprobs) - as_float(old_logprobs)
    ratio = torch.exp(log_ratio)
    adv = as_float(advantages)
    pg_losses = -adv * ratio
    pg_losses2 = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    token_losses = torch.maximum(pg_losses, pg_losses2)
    if token_weights is not None:
        token_losses = token_losses * as_float(token_weights).detach()
    pg_loss = masked_mean(token_losses, mask)
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
    v, old, ret = as_float(values), as_float(old_values), as_float(returns)
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
    ratio = torch.exp(as_float(logprobs) - as_float(old_logprobs))
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
