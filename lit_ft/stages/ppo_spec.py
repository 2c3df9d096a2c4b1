"""PPO's hyper-parameters: `PPOSpec`, the `model.ppo` section of configs/ppo.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lit_ft.validation import check_spec


@dataclass
class PPOSpec:
    """PPO hyper-parameters; defaults follow Ziegler et al. 2019 and TRL's former PPOTrainer."""

    samples_per_prompt: int = 1
    """Responses sampled for each prompt of a batch, side by side (a rollout then holds batch_size x this many
    episodes; OpenRLHF's `n_samples_per_prompt`): correct and wrong answers to one question to contrast. On the
    demo task, fewer prompts x more samples at equal episodes learned less than distinct prompts; more episodes a
    rollout (32 prompts x 4) learned fastest per rollout (BENCHMARKS.md, fourth session)."""
    ppo_epochs: int = 4
    """Optimisation epochs over each rollout batch."""
    mini_batch_size: int = 8
    """Rows per forward/backward (also the chunk size of the no-grad rollout passes)."""
    gradient_accumulation_steps: int = 1
    """Minibatches per optimizer step (an optimizer step sees mini_batch_size * this many rows)."""
    cliprange: float = 0.2
    """Clip range of the policy ratio (Schulman et al. 2017)."""
    cliprange_value: float = 0.2
    """Clip range of the value update around the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda (Schulman et al. 2016)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator in the reward (Schulman 2020); k1 = logp - ref_logp as in Ziegler et al."""
    init_kl_coef: float = 0.2
    """Initial (or fixed) KL penalty coefficient beta."""
    adaptive_kl: bool = True
    """Adapt beta towards `target` (Ziegler et al. 2019, sec. 2.2)."""
    target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    horizon: float = 10000.0
    """Horizon (in episodes) of the adaptive controller."""
    target_kl: float | None = None
    """Early stop: skip the remaining PPO epochs of a rollout once an epoch's mean approxkl exceeds
    1.5 * target_kl (TRL's former `target_kl` with `early_stopping=True`). None disables it."""
    ratio_threshold: float | None = 10.0
    """Skip a minibatch whose mean policy ratio exceeds this (loss spikes); None disables the guard."""
    whiten_rewards: bool = False
    """Rescale the per-token rewards to unit variance before GAE (mean kept)."""
    score_clip: float | None = None
    """Clip scores to [-score_clip, score_clip]."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that never emit EOS (truncated)."""
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Correct the policy loss for the sampler not computing exactly the trained policy (a merged copy in bf16, the
    static engine's kernels, a quantized base; Yao et al. 2025; TRL's `vllm_importance_sampling_correction`): each
    token's policy loss is weighted by w = exp(old_logprobs - sampler_logprobs), detached, the old log-probs being
    the no-grad training forward's of the rollout. `tis`: min(w, rollout_correction_cap) (truncated importance
    sampling); `mis`: w, or 0 where w > rollout_correction_cap (masked importance sampling: the token carries no
    loss). `none`: no weight. The mismatch itself is logged on every rollout (`rollout/logprob_diff_mean`,
    `rollout/logprob_diff_max`, `rollout/kl_sampler_train`); with a correction also `rollout/correction_weight_mean`
    and `rollout/correction_masked_frac` (tokens above the cap). The value loss is not weighted."""
    rollout_correction_cap: float = 2.0
    """The cap of `rollout_correction` (above 1: a weight of 1 is no correction)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm of each optimizer step."""
    disable_dropout: bool = True
    """Zero every dropout (rollout, old log-probs and updates then compare one function; Huang et al. 2024)."""

    def __post_init__(self):
        check_spec(self, "model.ppo")
