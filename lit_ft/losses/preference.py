"""Offline preference losses (DPO and its family): pure functions of per-sequence log-prob sums (re-exported by
`lit_ft.losses`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Offline preference optimisation (DPO and its family) over PER-SEQUENCE log-probability sums: every input below is
# a ``[B]`` tensor, one entry per preference pair, holding sum_t log pi(y_t | x, y_<t) over the response tokens of
# the chosen (or rejected) response; ``*_tokens`` are the ``[B]`` response token counts (for the length-normalised
# losses). Each function returns the per-pair losses ``[B]`` (fp32); the caller takes the mean. The implicit rewards
# that TRL logs as ``rewards/chosen`` and ``rewards/rejected`` come from :func:`preference_loss`.

def _acc(x: Tensor) -> Tensor:
    """fp32 (fp64 stays fp64, so double-precision tests are exact)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


PREFERENCE_LOSSES = ("sigmoid", "robust", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")


def dpo_logits(chosen_logps: Tensor, rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor) -> Tensor:
    """``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))``, ``[B]`` fp32: the margin of the
    log-ratios that every reference-based loss below is a function of (Rafailov et al. 2023, eq. 7)."""
    return (_acc(chosen_logps) - _acc(ref_chosen_logps)) - (_acc(rejected_logps) - _acc(ref_rejected_logps))


def sigmoid_preference_loss(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h)`` for ``h`` = :func:`dpo_logits`.

    With ``label_smoothing`` = eps > 0 this is conservative DPO (cDPO, Mitchell 2023, "A note on DPO with noisy
    preferences"): each label is taken as flipped with probability eps, giving
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. At the start (policy == reference, h = 0) the
    loss is ``log 2`` whatever eps.
    """
    z = beta * logits
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def robust_preference_loss(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably robust DPO", eq. 8): an unbiased loss under labels flipped with
    probability eps = ``label_smoothing`` < 1/2:
    ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    z = beta * logits
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def ipo_loss(logits: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, "A general theoretical paradigm...", eq. 17): ``(h - 1 / (2 tau))^2`` with tau =
    ``beta``. As in the paper's token-level form and TRL, ``h`` is built from LENGTH-AVERAGED log-probs (sum /
    response tokens), which :func:`preference_loss` does before calling this."""
    return (logits - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(logits: Tensor, beta: float) -> Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023, eq. 2) on the DPO log-ratio margin, as TRL's ``hinge``:
    ``max(0, 1 - beta * h)`` (beta is 1/delta, the inverse of the margin)."""
    return torch.relu(1.0 - beta * logits)


def simpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
               beta: float, gamma: float, label_smoothing: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free: the implicit reward is the length-normalised log-prob
    ``beta / |y| * log pi(y | x)`` and the chosen one must exceed the rejected one by the target margin ``gamma``:
    ``-log sigmoid(beta * (lp_w / |y_w| - lp_l / |y_l|) - gamma)`` (label smoothing as in
    :func:`sigmoid_preference_loss`)."""
    z = beta * (_acc(chosen_logps) / chosen_tokens.clamp(min=1) - _acc(rejected_logps) / rejected_tokens.clamp(min=1))
    return sigmoid_preference_loss(z - gamma, 1.0, label_smoothing)


def log_odds(mean_logps: Tensor) -> Tensor:
    """``log(p / (1 - p))`` of ``p = exp(mean_logps)`` (the geometric-mean token probability), computed as
    ``mean_logps - log(-expm1(mean_logps))``, which stays finite as p -> 1 (log-probs are clamped just below 0)."""
    x = _acc(mean_logps).clamp(max=-1e-6)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor,
              beta: float) -> tuple[Tensor, Tensor]:
    """ORPO (Hong et al. 2024, eq. 6-7), reference-free: the SFT loss on the chosen response plus ``beta`` (the
    paper's lambda) times the odds-ratio term ``-log sigmoid(log odds(y_w) - log odds(y_l))``, where odds use the
    length-averaged log-probs (eq. 4).

    Returns ``(loss [B], log_odds_ratio [B])``: the per-pair ``nll + beta * L_OR`` with ``nll = -lp_w / |y_w|``
    (the chosen response's mean token NLL), and the log odds ratio that TRL logs.
    """
    mc = _acc(chosen_logps) / chosen_tokens.clamp(min=1)
    mr = _acc(rejected_logps) / rejected_tokens.clamp(min=1)
    ratio = log_odds(mc) - log_odds(mr)
    return -mc - beta * F.logsigmoid(ratio), ratio


def preference_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One of :data:`PREFERENCE_LOSSES` with the implicit rewards that TRL logs.

    Args:
        chosen_logps, rejected_logps: ``[B]`` policy log-prob sums of the chosen / rejected responses.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the reference (None for simpo and orpo).
        chosen_tokens, rejected_tokens: ``[B]`` response token counts.
        loss_type: ``sigmoid`` (DPO; cDPO with label_smoothing), ``robust`` (rDPO), ``ipo``, ``hinge`` (SLiC),
            ``simpo`` or ``orpo``.
        beta: the KL strength of DPO (0.1, Rafailov et al. 2023), tau of IPO, 1/delta of the hinge, SimPO's reward
            scale, ORPO's lambda.
        label_smoothing: the assumed label-flip rate eps of cDPO / rDPO (sigmoid, robust, simpo).
        simpo_gamma: SimPO's target reward margin.
        rpo_alpha: add ``rpo_alpha`` x the chosen response's mean token NLL (RPO, Pang et al. 2024, "Iterative
            reasoning preference optimization", eq. 1); None or 0 adds nothing.

    Returns:
        ``(losses [B], chosen_rewards [B], rejected_rewards [B])``; rewards are detached: ``beta * (log pi -
        log pi_ref)`` of each response for the reference-based losses (the DPO implicit reward; IPO's from the
        length-averaged log-probs it uses), ``beta * lp / |y|`` for simpo and orpo.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
    c, r = _acc(chosen_logps), _acc(rejected_logps)
    nc, nr = chosen_tokens.clamp(min=1).to(c.dtype), rejected_tokens.clamp(min=1).to(c.dtype)
    if loss_type in REFERENCE_FREE_LOSSES:
        if loss_type == "simpo":
            losses = simpo_loss(c, r, nc, nr, beta, simpo_gamma, label_smoothing)
        else:
            losses, _ = orpo_loss(c, r, nc, nr, beta)
        rewards = beta * c / nc, beta * r / nr
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type {loss_type!r} needs the reference log-probs")
        rc, rr = _acc(ref_chosen_logps), _acc(ref_rejected_logps)
        if loss_type == "ipo":  # the token-averaged log-ratios (Azar et al. 2023; TRL)
            c, r, rc, rr = c / nc, r / nr, rc / nc, rr / nr
        h = dpo_logits(c, r, rc, rr)
        if loss_type == "sigmoid":
            losses = sigmoid_preference_loss(h, beta, label_smoothing)
        elif loss_type == "robust":
            losses = robust_preference_loss(h, beta, label_smoothing)
        elif loss_type == "ipo":
            losses = ipo_loss(h, beta)
        else:
            losses = hinge_loss(h, beta)
        rewards = beta * (c - rc), beta * (r - rr)
    if rpo_alpha:
        losses = losses + rpo_alpha * (-_acc(chosen_logps) / nc)
    return losses, rewards[0].detach(), rewards[1].detach()


# KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") works on UNPAIRED examples:
# each completion is labelled desirable or undesirable on its own. Its reference point z0 is the KL between the
# policy and the reference, estimated from MISMATCHED pairs (a prompt with another example's completion), whose
# log-ratios say how far the policy has moved from the reference in general rather than on this answer.


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """The KL estimate behind KTO's reference point: the mean over mismatched pairs of ``log pi(y'|x) -
    log pi_ref(y'|x)`` (``[M]`` log-prob sums each), a detached fp32 scalar; 0 when there are none. Not clamped:
    :func:`kto_loss` clamps it at 0 (after the caller has averaged it over ranks)."""
    if policy_kl_logps.numel() == 0:
        return policy_kl_logps.new_zeros((), dtype=torch.float32)
    return (_acc(policy_kl_logps) - _acc(ref_kl_logps)).mean().detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """KTO's loss of each example (Ethayarajh et al. 2024, eq. 8; TRL's ``loss_type="kto"``).

    With the log-ratio ``r = log pi(y|x) - log pi_ref(y|x)`` of the example's completion and the reference point
    ``z0 = max(0, kl)``, detached (``kl``: :func:`kto_kl`, the batch's mismatched-pair estimate):

    - desirable: ``desirable_weight * (1 - sigmoid(beta * (r - z0)))``
    - undesirable: ``undesirable_weight * (1 - sigmoid(beta * (z0 - r)))``

    Args:
        policy_logps, ref_logps: ``[B]`` log-prob sums of each example's completion under the policy / reference.
        desirable: ``[B]`` bool, True for a desirable (good) example.
        kl: scalar, the KL estimate (a tensor; averaged over ranks by the caller under DDP).
        beta: the KL strength (0.1, as DPO's).
        desirable_weight, undesirable_weight: lambda_D and lambda_U of the paper.

    Returns:
        ``(losses [B], rewards [B], z0)``: the per-example losses (the caller takes the mean), the implicit
        rewards ``beta * r`` (detached, what TRL logs as ``rewards/chosen`` and ``rewards/rejected``), and ``z0``.
        At the start (policy == reference, so r = 0 and kl = 0) every loss is its weight x 1/2.
    """
    r = _acc(policy_logps) - _acc(ref_logps)
    z0 = _acc(torch.as_tensor(kl, device=r.device)).detach().clamp(min=0)
    d = desirable.to(device=r.device, dtype=torch.bool)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    return torch.where(d, good, bad), (beta * r).detach(), z0
