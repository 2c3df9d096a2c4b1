"""The mismatch between the policy that sampled a rollout and the policy that is trained on it: how far apart their
log-probs of the same tokens are, and the truncated / masked importance weights that correct the policy loss for it
(Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training"; TRL's
``vllm_importance_sampling_correction``); every name is re-exported by `lit_ft.losses`.

Pure functions over tensors (imports torch only), with the conventions of `lit_ft.losses.masked`: per-token tensors
``[B, T]`` over response tokens, ``mask`` 1 on real response tokens (up to and including EOS), 0 after.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_ft.losses.masked import as_float, masked_mean, masked_sum

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")


def _log_weights(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``train_logprobs - sampler_logprobs`` on the masked tokens, 0 elsewhere (whatever a pad position holds,
    -inf included, never reaches an exp() or a sum)."""
    keep = mask.bool()
    return torch.where(keep, as_float(train_logprobs), 0.0) - torch.where(keep, as_float(sampler_logprobs), 0.0)


@torch.no_grad()
def rollout_correction(train_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str,
                       cap: float) -> Tensor | None:
    """Per-token weights of the policy loss that correct for the sampler not being the trained policy.

    ``w = exp(train_logprobs - sampler_logprobs)``, the importance weight of a token drawn from the sampler under
    the policy the loss takes as the old one (its no-grad training forward), detached:

    * ``none``: no weights (None).
    * ``tis`` (truncated importance sampling): ``min(w, cap)``.
    * ``mis`` (masked importance sampling): ``w`` where ``w <= cap``, 0 above: a token the trainer finds far more
      likely than the sampler did carries no loss at all (TRL's ``token_mask`` mode).

    The weights multiply the per-token policy-gradient loss before it is aggregated (the denominators of the
    aggregation are unchanged). Shapes: ``[B, T]`` each -> ``[B, T]`` fp32, 0 outside the mask.
    """
    if mode == "none":
        return None
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; expected one of {ROLLOUT_CORRECTIONS}")
    w = torch.exp(_log_weights(train_logprobs, sampler_logprobs, mask))
    w = w.clamp(max=cap) if mode == "tis" else torch.where(w <= cap, w, 0.0)
    return w * as_float(mask)


@torch.no_grad()
def rollout_mismatch(sampler_logprobs: Tensor, train_logprobs: Tensor, mask: Tensor, mode: str = "none",
                     cap: float = 2.0) -> dict[str, Tensor]:
    """How far the sampler's log-probs of the sampled tokens are from the training forward's, over the masked tokens.

    With ``d = sampler_logprobs - train_logprobs``: ``logprob_diff_mean`` (mean ``|d|`` over every response token),
    ``logprob_diff_max`` (the largest ``|d|``; 0 without tokens), ``kl_sampler_train`` (the mean over rows of each
    row's sum of ``d``: the k1 estimate of KL(sampler || trainer) per sequence, the tokens being the sampler's draws).
    With a correction ``mode`` (:func:`rollout_correction`) also ``correction_weight_mean`` (the mean weight the loss
    applies, token mean) and ``correction_masked_frac`` (the share of tokens whose weight exceeds ``cap``: masked
    under ``mis``, truncated to ``cap`` under ``tis``). Shapes: ``[B, T]`` each -> scalars (fp32, detached).
    """
    d = -_log_weights(train_logprobs, sampler_logprobs, mask)
    stats = {"logprob_diff_mean": masked_mean(d.abs(), mask),
             "logprob_diff_max": d.abs().max() if d.numel() else d.new_zeros(()),
             "kl_sampler_train": masked_sum(d, mask, dim=1).mean() if d.shape[0] else d.new_zeros(())}
    if mode != "none":
        weights = rollout_correction(train_logprobs, sampler_logprobs, mask, mode, cap)
        stats["correction_weight_mean"] = masked_mean(weights, mask)
        stats["correction_masked_frac"] = masked_mean((torch.exp(-d) > cap).float(), mask)
    return stats
