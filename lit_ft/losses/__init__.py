"""Layer 1, pure tensor math. May import: torch only (nothing else of lit_ft).

- `lm`: the chunked causal-LM loss with the model's own logit transform, token log-probs and entropy, Bradley-Terry.
- `preference`: the DPO family (sigmoid, IPO, hinge, robust, SimPO, ORPO) over per-sequence log-prob sums, and KTO
  (unpaired examples, the KL reference point from mismatched pairs).
- `masked`: masked statistics over response tokens, KL estimators, the response mask after EOS.
- `group`: critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, DAPO's overlong penalty), loss aggregation.
- `ppo`: KL-shaped rewards, GAE, the PPO policy and value losses, KL controllers.
- `mismatch`: the sampler/trainer log-prob mismatch of a rollout and its truncated / masked importance weights.
- `distill`: GKD's generalised Jensen-Shannon divergence over the vocabulary, per token, in chunks of tokens.

Shapes are in each function's docstring; every function is tested against hand-derived numbers. `lit_ft.losses` is
the one import for all of them.
"""

from lit_ft.losses.distill import chunked_generalized_jsd, generalized_jsd, reverse_kl  # noqa: F401
from lit_ft.losses.group import (  # noqa: F401
    ADVANTAGE_ESTIMATORS, GRPO_STD_EPS, aggregate_loss, clipped_policy_loss, group_advantages, overlong_penalty,
    zero_std_groups,
)
from lit_ft.losses.lm import (  # noqa: F401
    LogitTransform, bradley_terry_loss, causal_lm_loss, entropy_from_logits, selective_log_softmax,
)
from lit_ft.losses.masked import (  # noqa: F401
    as_float, first_true_index, kl_estimate, last_true_index, masked_mean, masked_sum, masked_var, masked_whiten,
    response_mask_after_eos,
)
from lit_ft.losses.mismatch import ROLLOUT_CORRECTIONS, rollout_correction, rollout_mismatch  # noqa: F401
from lit_ft.losses.ppo import (  # noqa: F401
    AdaptiveKLController, FixedKLController, compute_rewards, gae, kl_controller, kl_looks_wrong, ppo_policy_loss,
    ppo_value_loss, ratio_guard,
)
from lit_ft.losses.preference import (  # noqa: F401
    PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, dpo_logits, hinge_loss, ipo_loss, kto_kl, kto_loss, log_odds, orpo_loss,
    preference_loss, robust_preference_loss, sigmoid_preference_loss, simpo_loss,
)
