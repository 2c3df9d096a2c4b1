"""RLHF with PPO and a KL penalty as a LightningModule (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al.
2024, "The N+ implementation details of RLHF with PPO").

One ``training_step`` = one rollout batch of prompts followed by ``ppo.ppo_epochs`` passes of shuffled minibatch
updates (manual optimization). Every role (policy, reference, value, reward) is a LoRA adapter on ONE frozen base
(`lit_ft.online.roles`), so a PPO run holds the base weights once.

Run length: ``trainer.max_steps`` counts OPTIMIZER steps under manual optimization (about
``ppo_epochs * batch_size / (mini_batch_size * gradient_accumulation_steps)`` per rollout). Set the number of
rollouts with ``trainer.max_epochs`` x ``trainer.limit_train_batches`` (or the dataset size) and leave
``max_steps=-1``; the learning-rate schedule is stepped once per rollout and spans that many rollouts.
Do not set ``trainer.gradient_clip_val`` or ``accumulate_grad_batches``: use ``ppo.max_grad_norm`` and
``ppo.gradient_accumulation_steps``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lit_ft.train import checkpointing, optim, runs

from lit_ft.online import checks, roles, shared as online
from lit_ft.errors import ConfigError
from lit_ft.online.generation import SamplingSpec
from lit_ft.models import LoraSpec, ModelSpec, eval_mode
from lit_ft.online.batch import Rollout
from lit_ft.online.episodes import Environment, EpisodeSpec
from lit_ft.stages.ppo_spec import PPOSpec
from lit_ft.validation import check_init
from lit_ft.losses import compute_rewards, gae, kl_controller, kl_looks_wrong, masked_mean, masked_whiten, ppo_policy_loss, \
    ppo_value_loss, ratio_guard


class PPOModule(L.LightningModule):
    """PPO with a KL penalty over LoRA adapters of one base (see the module docstring for the run length)."""

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoraSpec | None = LoraSpec(),
        sft_adapter: str | None = None,
        reward_adapter: str | None = None,
        reward_fn: str | None = None,
        reward_fn_weight: float = 1.0,
        value_model: Literal["adapter", "shared_trunk"] = "adapter",
        sampling: SamplingSpec = SamplingSpec(),
        ppo: PPOSpec = PPOSpec(),
        optim: optim.OptimSpec = optim.OptimSpec(lr=5e-5, scheduler="constant", warmup_ratio=0.0),
        sample_table_every: int = 10,
        environment: Environment | None = None,
        episodes: EpisodeSpec = EpisodeSpec(),
        compile: bool | None = None,
    ):
        """
        Args:
            base: the frozen base model (dtype, quantization, gradient checkpointing).
            lora: LoRA of a new policy when there is no SFT adapter, and of a new value adapter without a reward adapter.
            sft_adapter: SFT adapter directory: the policy starts from it and a frozen copy is the reference.
                None: new LoRA policy, and the base without adapters is the reference.
            reward_adapter: reward export directory (SEQ_CLS LoRA + `score` head [+ reward_normalization.json]).
            reward_fn: dotted path of `fn(prompts, responses, answers) -> list[float]` on decoded texts
                (e.g. `lit_ft.data.tasks.correctness_reward`), added to the reward-model score times `reward_fn_weight`.
            reward_fn_weight: weight of `reward_fn` in the score.
            value_model: `adapter` (own LoRA + head, from the reward model when given) or `shared_trunk` (a head
                on the policy's hidden states; cheaper, but the value loss then also trains the policy adapter).
            sampling: rollout sampling (temperature also divides the logits of every log-prob).
            ppo: PPO hyper-parameters.
            optim: optimizer and learning-rate schedule (stepped once per rollout).
            sample_table_every: log a W&B table of prompts, responses and scores every this many rollouts (0: never).
            environment: multi-turn episodes against this object (`{class_path: ..., init_args: ...}`: as GRPO's,
                `lit_ft.online.episodes`): the episode's reward is the score (plus the reward model's and reward_fn's
                of the final turn, when set), the KL, values and GAE run over the model's own tokens only (the
                environment's turns are attended, never scored or trained). None: one response a prompt.
            episodes: the episodes' limits (max_turns, max_tokens) and the tool-call format.
            compile: `torch.compile` each decoder layer in the update's gradient passes only (the rollouts, the decode
                engine, scoring and the no-grad log-prob passes run eagerly: `compile_gradient_passes`); inductor
                fuses the element-wise work of the policy and value passes. None (the default): `--memory auto` (the
                default of `lit-ft fit`) decides: on a GPU and an unquantized base, on when the run has rollouts
                enough for the faster updates to pay for compiling (about 100 s; `lit_ft.plan.auto`), else off;
                true/false fix it.
        """
        check_init("model (PPOModule)", PPOModule, locals())
        super().__init__()
        self.save_hyperparameters()
        online.init_environment(self, environment, episodes, sampling)
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        online.init_stage(self, base, lora, sft_adapter, reward_adapter, reward_fn, reward_fn_weight, sampling, optim,
                          sample_table_every, compile=compile)
        self.ppo = ppo = checkpointing.as_spec(PPOSpec, ppo)
        if ppo.samples_per_prompt < 1:
            raise ConfigError(f"model.ppo.samples_per_prompt: must be >= 1, got {ppo.samples_per_prompt}")
        self.value_model = value_model
        self.kl_ctl = kl_controller(ppo.adaptive_kl, ppo.init_kl_coef, ppo.target, ppo.horizon)
        self.counters = {"rollouts": 0, "skipped_batches": 0, "skipped_minibatches": 0}

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        export = online.build_roles(self, self.value_model, self.ppo.disable_dropout)
        self.value_head = roles.value_head_from(export, self.model.get_base_model().config.hidden_size)

    def setup(self, stage: str) -> None:
        checks.setup(self, stage, "PPO")

    # -- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        # 1. Rollout: sample with the policy adapter (eval mode, KV cache); tokens after EOS are masked out.
        # 2. Score prompt+response (reward adapter at the last real token and/or the reward callable); a batch
        #    with a non-finite score is skipped on every rank alike.
        got = online.sample_and_score(self, batch, self.ppo.samples_per_prompt, "ppo/skipped_batches")
        if got is None:
            return None
        batch, ro, scores, texts, parts = got
        # 3. No-grad passes: old log-probs (+entropy), reference log-probs, values; KL-shaped rewards.
        self.evaluate_rollout(ro)
        kl_coef = self.kl_ctl.value
        rewards, kl = compute_rewards(scores, ro.old_logprobs, ro.ref_logprobs, ro.mask, kl_coef, self.ppo.kl_estimator)
        # 4. Adaptive KL controller on the mean sequence KL (Ziegler et al. 2019), over all ranks.
        seq_kl = self.trainer.strategy.reduce(kl.sum(1).mean(), reduce_op="mean")
        self.kl_ctl.update(seq_kl, ro.mask.shape[0] * self.trainer.world_size)
        if kl_looks_wrong(seq_kl):
            rank_zero_warn(f"objective/kl = {float(seq_kl):.3f} < 0: responses do not look sampled from the policy "
                           "whose log-probs PPO uses; check sampling.top_k / top_p / temperature")
        # 5. GAE advantages whitened over the batch's response tokens; returns = advantages + values.
        if self.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, ro.mask, shift_mean=False)
        ro.advantages, ro.returns = gae(ro.values, rewards, ro.mask, self.ppo.gamma, self.ppo.lam)
        ro.advantages = masked_whiten(ro.advantages, ro.mask)
        t1 = time.perf_counter()
        # 6. PPO epochs over shuffled minibatches (clipped surrogate + clipped value loss).
        stats = self.ppo_update(ro)
        # 7. Log (the sampler/trainer mismatch under rollout/).
        stats.update(online.mismatch_stats(ro.sampler_logprobs, ro.old_logprobs, ro.mask, self.ppo.rollout_correction,
                                           self.ppo.rollout_correction_cap))
        stats.update({f"objective/{k}": v for k, v in parts.items()})
        stats.update({"objective/scores": scores.mean(), "objective/kl": seq_kl, "objective/kl_coef": kl_coef,
                      "objective/entropy": masked_mean(ro.entropy, ro.mask),
                      "ppo/returns/mean": masked_mean(ro.returns, ro.mask),
                      "ppo/response_length": ro.mask.sum(1).float().mean(),
                      "time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        stats.update(self.episode_stats if self.environment is not None else {})
        self.log_dict({k: float(v) for k, v in stats.items()}, on_step=True, batch_size=len(ro.mask))
        online.log_samples(self, "ppo/samples", batch["prompts"], texts, scores)
        return None

    rollout = online.rollout  # one response per prompt row (the decode engine), see lit_ft.online.shared

    def score(self, batch: dict, ro: Rollout) -> tuple[Tensor, list[str], dict[str, Tensor]]:
        """Scores [B] (reward model, reward callable, EOS penalty, clipping), decoded responses, components."""
        return online.score(self, batch, ro, self.ppo.missing_eos_penalty, self.ppo.score_clip,
                            self.ppo.mini_batch_size)

    @torch.no_grad()
    def evaluate_rollout(self, ro: Rollout) -> None:
        """Fill old_logprobs, entropy, ref_logprobs and values, in eval mode, in chunks of mini_batch_size rows."""
        mbs = self.ppo.mini_batch_size
        values = online.old_and_ref_logprobs(self, ro, mbs, None if self.roles.has_value_adapter else self.value_head)
        if self.roles.has_value_adapter:
            with eval_mode(self.model), self.roles.active(roles.VALUE):
                values = torch.cat([self.value_forward(ro.rows(s)) for s in online.slices(len(ro.mask), mbs)])
        ro.values = values * ro.mask

    def policy_forward(self, ro: Rollout, entropy: bool = False):
        """(log-probs, entropy or None, shared-trunk values or None) under the policy adapter."""
        with self.roles.active(roles.POLICY):
            return online.logprobs(self, ro, entropy, None if self.roles.has_value_adapter else self.value_head)

    def value_forward(self, ro: Rollout) -> Tensor:
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.visible)
        h = roles.response_hidden(roles.trunk(self.model, ids, mask, pos), ro.input_ids.shape[1])
        return roles.head_values(self.value_head, h)

    def ppo_update(self, ro: Rollout) -> dict[str, Tensor]:
        """`ppo_epochs` x shuffled minibatches, token-weighted; returns the mean minibatch stats and the counters."""
        p = self.ppo

        def early_stop(stats: list[dict]) -> bool:  # TRL's former early stopping: KL above 1.5 x target_kl
            kl = [s["ppo/policy/approxkl"] for s in stats]
            return p.target_kl is not None and online.mean_over_ranks(self, kl) > 1.5 * p.target_kl

        out, epochs = online.update(self, ro, p.ppo_epochs, p.mini_batch_size, p.gradient_accumulation_steps,
                                    ro.mask.sum(1), self.minibatch_step, p.max_grad_norm, early_stop)
        out.update({"ppo/epochs": torch.tensor(float(epochs)),
                    "ppo/skipped_minibatches": torch.tensor(float(self.counters["skipped_minibatches"]))})
        return out

    def minibatch_step(self, mb: Rollout, scale: float) -> dict[str, Tensor] | None:
        """Policy and value losses of one minibatch, back-propagated (each role's backward before switching)."""
        p = self.ppo
        logprobs, _, shared_values = self.policy_forward(mb)
        if p.ratio_threshold is not None and ratio_guard(logprobs, mb.old_logprobs, mb.mask, p.ratio_threshold):
            return None
        weights = online.correction_weights(mb, mb.old_logprobs, "model.ppo.rollout_correction", p.rollout_correction,
                                            p.rollout_correction_cap)
        pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, p.cliprange, weights)
        if shared_values is None:  # own value adapter: finish the policy's backward, then switch adapters
            self.manual_backward(pg_loss * scale)
            with self.roles.active(roles.VALUE):
                values = self.value_forward(mb)
                vf_loss, vf_stats = ppo_value_loss(values, mb.values, mb.returns, mb.mask, p.cliprange_value)
                self.manual_backward(p.vf_coef * vf_loss * scale)
        else:
            vf_loss, vf_stats = ppo_value_loss(shared_values, mb.values, mb.returns, mb.mask, p.cliprange_value)
            self.manual_backward((pg_loss + p.vf_coef * vf_loss) * scale)
        return {"ppo/loss/policy": pg_loss.detach(), "ppo/loss/value": vf_loss.detach(),
                "ppo/loss/total": (pg_loss + p.vf_coef * vf_loss).detach(),
                "ppo/policy/clipfrac": pg_stats["clipfrac"], "ppo/policy/approxkl": pg_stats["approxkl"],
                "ppo/policy/ratio_max": pg_stats["ratio_max"], "ppo/val/clipfrac": vf_stats["vf_clipfrac"]}

    # -- validation, logging, optimizers ----------------------------------------------------------------------

    validation_step = online.validation_step
    on_validation_epoch_start = online.on_validation_epoch_start
    on_validation_epoch_end = online.on_validation_epoch_end
    configure_optimizers = online.configure_optimizers

    # -- checkpoints and export -----------------------------------------------------------------------------

    configure_callbacks = runs.configure_callbacks  # exact resume, resume rules, run lock, preemption
    load_state_dict = checkpointing.load_trainable  # the frozen base is not 'missing' from a checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        online.save_checkpoint(self, checkpoint, "ppo_counters", extra={"kl_controller": self.kl_ctl.state_dict()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        online.load_checkpoint(self, checkpoint, "ppo_counters")
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])

    def save_adapter(self, path: str | Path, tokenizer=None) -> Path:
        """Export the policy adapter in PEFT format to `path` (and the value adapter + head to `path/value`)."""
        path = online.export_policy(self, path, tokenizer)
        roles.export_value(self.model, self.value_head, path / "value", self.roles.has_value_adapter)
        return path
