"""GRPO's and RLOO's hyper-parameters (`GRPOSpec`, the `model.grpo` section of configs/grpo.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_ft.errors import ConfigError
from lit_ft.validation import check_spec


@dataclass
class GRPOSpec:
    """Critic-free policy optimisation with group baselines; defaults follow TRL's current GRPOConfig and DAPO."""

    samples_per_prompt: int = 8
    """Responses sampled for each prompt (the group; TRL's `num_generations`, 8). A rollout holds batch_size x this
    many episodes. At least 2 for the group estimators (a group of one has no baseline)."""
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    """`grpo`: group mean and std (Shao et al. 2024); `dr_grpo`: group mean only (Liu et al. 2025); `rloo`:
    leave-one-out mean (Ahmadian et al. 2024); `reinforce_pp`: mean and std of the global batch (Hu 2025)."""
    num_iterations: int = 1
    """Passes of clipped updates over each rollout (GRPO's mu; TRL's `num_iterations`, 1: on-policy, the ratio is 1
    at the first minibatch and clipping acts only after earlier optimizer steps of the same rollout). At 1, when
    a rollout's kept rows take a single optimizer step (at most mini_batch_size x gradient_accumulation_steps of
    them), the old log-probs are the update's own, detached: no separate no-grad policy pass."""
    mini_batch_size: int = 8
    """Rows per forward/backward (also the chunk size of the no-grad passes)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step."""
    loss_aggregation: Literal["sequence_mean", "token_mean", "constant"] = "token_mean"
    """`token_mean`: the mean over every response token of an optimizer step on all ranks (DAPO; TRL's default
    `loss_type`); `sequence_mean`: each response's token mean, then the mean over responses (the original GRPO);
    `constant`: the token sum over rows x max_new_tokens (Dr. GRPO: no length bias)."""
    cliprange_low: float = 0.2
    """Lower clip range: the ratio is clipped below at 1 - this (Schulman et al. 2017; DAPO's epsilon_low)."""
    cliprange_high: float = 0.28
    """Upper clip range, 1 + this (DAPO's clip-higher, 0.28: low-probability tokens of good answers can rise)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """`token`: a ratio per token (GRPO, DAPO); `sequence`: GSPO (Zheng et al. 2025), every token weighted by its
    response's length-normalised sequence ratio exp(mean log-ratio), clipped per sequence (TRL's
    `importance_sampling_level`); `loss_aggregation: sequence_mean` then gives the paper's objective exactly. GSPO's
    paper clips far tighter than token-level ratios need (3e-4 / 4e-4): set cliprange_low/high with it."""
    policy_loss: Literal["clip", "cispo"] = "clip"
    """`clip`: PPO's clipped surrogate; `cispo` (MiniMax-M1, 2025; TRL's `loss_type="cispo"`): the importance ratio
    clipped to [cispo_ratio_min, cispo_ratio_max] and detached, times the advantage and the log-prob, so every
    token keeps a gradient (its weight bounded) where the clipped surrogate would drop it."""
    cispo_ratio_max: float = 5.0
    """`cispo`: the upper bound of the importance weight."""
    cispo_ratio_min: float | None = None
    """`cispo`: the lower bound of the importance weight (None: none; the paper leaves it open)."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Correct the policy loss for the sampler not computing exactly the trained policy (a merged copy in bf16, the
    static engine's kernels, a quantized base; Yao et al. 2025; TRL's `vllm_importance_sampling_correction`): each
    token's policy loss is weighted by w = exp(old_logprobs - sampler_logprobs), detached, the old log-probs being
    the no-grad training forward's of the rollout. `tis`: min(w, rollout_correction_cap) (truncated importance
    sampling); `mis`: w, or 0 where w > rollout_correction_cap (masked importance sampling: the token carries no
    loss). `none`: no weight. The mismatch itself is logged on every rollout (`rollout/logprob_diff_mean`,
    `rollout/logprob_diff_max`, `rollout/kl_sampler_train`); with a correction also `rollout/correction_weight_mean`
    and `rollout/correction_masked_frac` (tokens above the cap). The KL term (`beta`) is not weighted."""
    rollout_correction_cap: float = 2.0
    """The cap of `rollout_correction` (above 1: a weight of 1 is no correction)."""
    beta: float = 0.0
    """Weight of the k3 KL to the reference in the loss (Shao et al. 2024 used 0.04). 0 by default, as TRL since
    0.19, DAPO and Dr. GRPO: with a verifiable reward the policy is meant to move far from the SFT start and the KL
    term mostly slows it; the KL is still measured and logged (`train/kl`)."""
    log_kl: bool = True
    """At beta 0, still run the reference's no-grad pass to log `train/kl` (one forward over the kept rows a
    rollout); false skips it, as TRL does at beta 0. With beta > 0 the pass always runs."""
    dynamic_sampling: bool = False
    """Drop the groups whose rewards are all equal before the update (DAPO's dynamic sampling, without refilling):
    their advantage is 0 and they would only dilute the token mean; counted in `train/dynamic_sampling/*`."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never emit EOS (cut at max_new_tokens; TRL's name)."""
    overlong_buffer: int | None = None
    """DAPO's soft overlong punishment: the score falls linearly by up to `overlong_penalty` over the last this many
    tokens before max_new_tokens (DAPO: 4096 of 20480). None disables it."""
    overlong_penalty: float = 1.0
    """The soft overlong punishment at max_new_tokens."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of each optimizer step."""
    disable_dropout: bool = True
    """Zero every dropout (sampling, old log-probs and updates then compare one function)."""

    def __post_init__(self):
        check_spec(self, "model.grpo")
        if self.advantage != "reinforce_pp" and self.samples_per_prompt < 2:
            raise ConfigError(f"model.grpo.samples_per_prompt={self.samples_per_prompt}: advantage "
                              f"{self.advantage} needs at least 2 samples a prompt (use reinforce_pp for 1)")
        if self.cispo_ratio_min is not None and self.cispo_ratio_min >= self.cispo_ratio_max:
            raise ConfigError(f"model.grpo.cispo_ratio_min={self.cispo_ratio_min}: expected below "
                              f"model.grpo.cispo_ratio_max={self.cispo_ratio_max}")
        if self.dynamic_sampling and self.samples_per_prompt < 2:
            raise ConfigError(f"model.grpo.samples_per_prompt={self.samples_per_prompt}: dynamic_sampling needs "
                              "groups of at least 2 samples")
