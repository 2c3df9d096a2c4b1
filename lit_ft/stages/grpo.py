"""Critic-free online RL as a LightningModule: GRPO (Shao et al. 2024), Dr. GRPO (Liu et al. 2025), RLOO (Ahmadian
et al. 2024) and REINFORCE++ (Hu 2025), with DAPO's token-level loss, clip-higher, dynamic sampling and overlong
punishment (Yu et al. 2025).

One ``training_step`` = one batch of prompts, each sampled ``grpo.samples_per_prompt`` times, scored (a reward
callable such as `lit_ft.data.tasks.correctness_reward` and/or a reward adapter), turned into one advantage per response
from the scores of its group (`lit_ft.losses.group_advantages`), followed by ``grpo.num_iterations`` passes of clipped
policy updates over shuffled minibatches (manual optimization). There is no value model: the policy adapter (a
trainable copy of the SFT adapter) and the reference (the SFT adapter frozen, or the bare base) are two adapters of
one frozen base (`lit_ft.online.roles`), so a run holds less than PPO's four roles. Rollout, scoring, reference log-probs,
the update loop, validation, the sample table and checkpoints are PPO's own functions (`lit_ft.online.shared`).

Run length: as for PPO, ``trainer.max_epochs`` x ``trainer.limit_train_batches`` rollouts (``max_steps=-1``; it
counts optimizer steps under manual optimization); use ``grpo.max_grad_norm`` and
``grpo.gradient_accumulation_steps``, not the Trainer's clipping and accumulation flags.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft.train import checkpointing, optim, runs

from lit_ft.online import checks, roles, shared as online
from lit_ft.errors import ConfigError
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.grpo_spec import GRPOSpec
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.online.batch import Rollout
from lit_ft.online.episodes import Environment, EpisodeSpec
from lit_ft.losses import clipped_policy_loss, group_advantages, masked_mean, overlong_penalty, zero_std_groups
from lit_ft.validation import check_init


class GRPOModule(L.LightningModule):
    """GRPO / RLOO / REINFORCE++ over a policy LoRA on one base (see the module docstring for the run length)."""

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        sft_adapter: str | None = None,
        lora: LoraSpec | None = LoraSpec(),
        grpo: GRPOSpec = GRPOSpec(),
        sampling: SamplingSpec = SamplingSpec(),
        reward_fn: str | None = None,
        reward_fn_weight: float = 1.0,
        reward_adapter: str | None = None,
        optim: optim.OptimSpec = optim.OptimSpec(lr=1e-5, scheduler="constant", warmup_ratio=0.0),
        sample_table_every: int = 10,
        environment: Environment | None = None,
        episodes: EpisodeSpec = EpisodeSpec(),
        compile: bool | None = None,
    ):
        """
        Args:
            base: the frozen base model (dtype, quantization, gradient checkpointing).
            sft_adapter: SFT adapter directory: the policy starts from it and a frozen copy is the reference.
                None: new LoRA policy, and the base without adapters is the reference.
            lora: LoRA of a new policy when there is no SFT adapter.
            grpo: advantage estimator, loss aggregation, clipping, KL, dynamic sampling, penalties.
            sampling: rollout sampling (temperature also divides the logits of every log-prob).
            reward_fn: dotted path of `fn(prompts, responses, answers) -> list[float]` on decoded texts (a
                verifiable reward: `lit_ft.data.tasks.correctness_reward`, `lit_ft.data.tasks.gsm8k_reward`), added to the
                reward-model score times `reward_fn_weight`.
            reward_fn_weight: weight of `reward_fn` in the score.
            reward_adapter: reward export directory (SEQ_CLS LoRA + `score` head [+ reward_normalization.json]).
            optim: optimizer and learning-rate schedule (stepped once per rollout). TRL's GRPOConfig defaults to
                lr 1e-6 for full fine-tuning; a LoRA policy takes 10-100x that (configs/grpo.yaml: 1e-4).
            sample_table_every: log a W&B table of prompts, responses and scores every this many rollouts (0: never).
            environment: multi-turn episodes against this object (`{class_path: ..., init_args: ...}`; its
                `reset(row)` and `step(messages)`: `lit_ft.online.episodes`): each rollout row is an episode of
                model and environment turns, only the model's tokens trained, the episode's reward added to the
                score (reward_fn, if set, reads the model's final turn). None: one response a prompt.
            episodes: the episodes' limits (max_turns, max_tokens) and the tool-call format.
            compile: `torch.compile` each decoder layer in the update's gradient passes only (the rollouts, the decode
                engine, scoring and the no-grad log-prob passes run eagerly: `compile_gradient_passes`); inductor
                fuses the element-wise work of the policy's passes. None (the default): `--memory auto` (the default
                of `lit-ft fit`) decides: on a GPU and an unquantized base, on when the run has rollouts enough for
                the faster updates to pay for compiling (about 100 s; `lit_ft.plan.auto`), else off; true/false fix
                it.
        """
        check_init("model (GRPOModule)", GRPOModule, locals())
        super().__init__()
        self.save_hyperparameters()
        online.init_environment(self, environment, episodes, sampling)
        if environment is not None and grpo is not None and checkpointing.as_spec(GRPOSpec, grpo).overlong_buffer \
                is not None:
            raise ConfigError("model.grpo.overlong_buffer: not with model.environment (an episode's model tokens "
                              "span several turns, each up to model.sampling.max_new_tokens)")
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        grpo = checkpointing.as_spec(GRPOSpec, grpo)
        if grpo.overlong_buffer is not None and grpo.overlong_buffer > checkpointing.as_spec(SamplingSpec, sampling) \
                .max_new_tokens:
            raise ConfigError(f"model.grpo.overlong_buffer={grpo.overlong_buffer}: expected at most "
                              "model.sampling.max_new_tokens")
        online.init_stage(self, base, lora, sft_adapter, reward_adapter, reward_fn, reward_fn_weight, sampling, optim,
                          sample_table_every, compile=compile)
        self.grpo = grpo
        if grpo.overlong_buffer is not None:
            self.val_parts["overlong"] = MeanMetric()
        self.counters = {"rollouts": 0, "skipped_batches": 0, "skipped_minibatches": 0, "groups": 0,
                         "dropped_groups": 0}
        self.on_policy_seen: list[tuple[Tensor, Tensor, Tensor]] = []  # (sampler, update's own, mask) a minibatch

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is None:
            online.build_roles(self, "none", self.grpo.disable_dropout)

    def setup(self, stage: str) -> None:
        checks.setup(self, stage, "GRPO")

    # -- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0, g = time.perf_counter(), self.grpo
        # 1. Rollout: k responses a prompt, side by side (the policy adapter, the decode engine).
        # 2. Score (reward callable and/or reward adapter, missing-EOS and overlong penalties); skip non-finite.
        got = online.sample_and_score(self, batch, g.samples_per_prompt, "train/skipped_batches")
        if got is None:
            return None
        batch, ro, scores, texts, parts = got
        # 3. One advantage a response from its group's scores; groups of equal scores are counted (and dropped).
        ro.advantages = self.advantages(scores)
        kept, group_stats = self.dynamic_sampling(ro, scores)
        # 4. No-grad passes over the kept rows: old log-probs and entropy (policy; not when the update is one
        #    on-policy optimizer step, which takes its own detached), reference log-probs (for the KL).
        minibatches = self.minibatches_per_pass(len(kept.mask))
        on_policy = g.num_iterations == 1 and minibatches <= g.gradient_accumulation_steps  # one optimizer step
        if len(kept.mask):
            online.old_and_ref_logprobs(self, kept, g.mini_batch_size, policy=not on_policy,
                                        reference=g.beta > 0 or g.log_kl)
        t1 = time.perf_counter()
        # 5. num_iterations passes of clipped updates over shuffled minibatches (weighted by the rollout correction).
        self.on_policy_seen = []
        stats = self.grpo_update(kept, minibatches)
        # 6. Log (TRL's GRPO names; the sampler/trainer mismatch under rollout/).
        stats.update(self.mismatch(kept))
        stats.update(group_stats)
        stats.update(self.episode_stats if self.environment is not None else {})
        stats.update({f"train/rewards/{k}/mean": v for k, v in parts.items()})
        stats.update({"train/reward": scores.mean(), "train/completions/mean_length": ro.mask.sum(1).float().mean(),
                      "train/completions/clipped_ratio": parts["no_eos"],
                      "time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        if len(kept.mask) and kept.entropy is not None:
            stats["train/entropy"] = masked_mean(kept.entropy, kept.mask)  # else the update's own (minibatch_step)
        self.log_dict({k: float(v) for k, v in stats.items()}, on_step=True, batch_size=len(ro.mask))
        online.log_samples(self, "train/completions", batch["prompts"], texts, scores)
        return None

    # PPO's own functions (lit_ft.online.shared): the rollout, held-out greedy validation, the optimizer and callbacks.
    rollout = online.rollout
    validation_step = online.validation_step
    on_validation_epoch_start, on_validation_epoch_end = online.on_validation_epoch_start, online.on_validation_epoch_end
    configure_optimizers, configure_callbacks = online.configure_optimizers, runs.configure_callbacks
    load_state_dict = checkpointing.load_trainable  # the frozen base is not 'missing' from a checkpoint

    def score(self, batch: dict, ro: Rollout) -> tuple[Tensor, list[str], dict[str, Tensor]]:
        """Scores [B] as PPO's (reward model, reward callable, missing-EOS penalty) plus DAPO's overlong penalty."""
        scores, texts, parts = online.score(self, batch, ro, self.grpo.missing_eos_penalty, None,
                                            self.grpo.mini_batch_size)
        if self.grpo.overlong_buffer is not None:
            penalty = overlong_penalty(ro.mask.sum(1), self.sampling.max_new_tokens, self.grpo.overlong_buffer,
                                       self.grpo.overlong_penalty)
            parts["overlong"] = penalty.mean()
            scores = scores + penalty
        return scores, texts, parts

    def advantages(self, scores: Tensor) -> Tensor:
        """[B] advantages; REINFORCE++ normalises over the global batch (every rank's scores: one all-reduce)."""
        moments = None
        if self.grpo.advantage == "reinforce_pp" and self.trainer.world_size > 1:
            x = scores.double()
            s = self.trainer.strategy.reduce(torch.stack([x.sum(), (x * x).sum(), x.new_tensor(len(x))]), "sum")
            mean = s[0] / s[2]
            var = (s[1] - s[2] * mean * mean) / (s[2] - 1).clamp(min=1)
            moments = (mean.float(), var.clamp(min=0).sqrt().float())
        return group_advantages(scores, self.grpo.samples_per_prompt, self.grpo.advantage, moments)

    def dynamic_sampling(self, ro: Rollout, scores: Tensor) -> tuple[Rollout, dict[str, Tensor]]:
        """The rows to train on (all, or with `dynamic_sampling` those of groups whose scores differ) and the
        group statistics: mean group std, share of equal-score groups, dropped and kept counts."""
        k = self.grpo.samples_per_prompt
        stats: dict[str, Tensor] = {}
        if k < 2:
            return ro, {"train/reward_std": scores.std() if len(scores) > 1 else scores.new_zeros(())}
        flat = zero_std_groups(scores, k)
        stats["train/reward_std"] = scores.view(-1, k).std(1).mean()
        stats["train/frac_reward_zero_std"] = flat.float().mean()
        self.counters["groups"] += len(flat)
        if not self.grpo.dynamic_sampling:
            return ro, stats
        self.counters["dropped_groups"] += int(flat.sum())
        stats.update({"train/dynamic_sampling/dropped_groups": flat.sum().float(),
                      "train/dynamic_sampling/kept_groups": (~flat).sum().float(),
                      "train/dynamic_sampling/dropped_total": torch.tensor(float(self.counters["dropped_groups"])),
                      "train/dynamic_sampling/groups_total": torch.tensor(float(self.counters["groups"]))})
        keep = (~flat).repeat_interleave(k).nonzero().flatten()
        return ro.rows(keep), stats

    def mismatch(self, ro: Rollout) -> dict[str, Tensor]:
        """The `rollout/*` figures over the kept rows: the sampler's log-probs against the old ones, those of the
        separate no-grad pass or, on-policy, the update's own (detached, collected by `minibatch_step` before the
        optimizer step: the weights that sampled)."""
        g, seen, self.on_policy_seen = self.grpo, self.on_policy_seen, []
        if ro.old_logprobs is None and seen:
            sampler, train, mask = (torch.cat(t) for t in zip(*seen))
            return online.mismatch_stats(sampler, train, mask, g.rollout_correction, g.rollout_correction_cap)
        return online.mismatch_stats(ro.sampler_logprobs, ro.old_logprobs, ro.mask, g.rollout_correction,
                                     g.rollout_correction_cap)

    def minibatches_per_pass(self, rows: int) -> int:
        """Minibatches of a pass over `rows` kept rows; every rank takes the same number (and so the same optimizer
        steps), whatever dynamic sampling kept on it: the most rows of any rank decide."""
        n = torch.tensor(float(rows), device=self.device)
        most = int(self.trainer.strategy.reduce(n, reduce_op="max")) if self.trainer.world_size > 1 else int(n)
        return max(1, -(-most // self.grpo.mini_batch_size))

    def grpo_update(self, ro: Rollout, minibatches: int) -> dict[str, Tensor]:
        """`num_iterations` x `minibatches` shuffled minibatches (`minibatches_per_pass`); each optimizer step's loss
        weighted by response tokens (`token_mean`) or rows (`sequence_mean`, `constant`) over its minibatches and
        every rank."""
        g = self.grpo
        weights = ro.mask.sum(1) if g.loss_aggregation == "token_mean" else torch.ones_like(ro.mask[:, 0])
        out, _ = online.update(self, ro, g.num_iterations, g.mini_batch_size, g.gradient_accumulation_steps,
                               weights, self.minibatch_step, g.max_grad_norm, min_groups=minibatches)
        out["train/skipped_minibatches"] = torch.tensor(float(self.counters["skipped_minibatches"]))
        return out

    def minibatch_step(self, mb: Rollout, scale: Tensor) -> dict[str, Tensor]:
        """The clipped surrogate (+ beta x k3 KL) of one minibatch, back-propagated times `scale`."""
        g = self.grpo
        on_policy = mb.old_logprobs is None  # one optimizer step a rollout: the old policy is this one
        with self.roles.active(roles.POLICY):
            logprobs, entropy, _ = online.logprobs(self, mb, entropy=on_policy)
        old = (logprobs.detach() * mb.mask) if on_policy else mb.old_logprobs
        if on_policy and mb.sampler_logprobs is not None:
            self.on_policy_seen.append((mb.sampler_logprobs, old, mb.mask))
        weights = online.correction_weights(mb, old, "model.grpo.rollout_correction", g.rollout_correction,
                                            g.rollout_correction_cap)
        loss, stats = clipped_policy_loss(logprobs, old, mb.advantages, mb.mask, g.cliprange_low,
                                          g.cliprange_high, g.loss_aggregation, self.sampling.max_new_tokens,
                                          mb.ref_logprobs, g.beta, g.importance_sampling_level, g.policy_loss,
                                          g.cispo_ratio_max, g.cispo_ratio_min, weights)
        self.manual_backward(loss * scale)
        if on_policy:
            stats["entropy"] = masked_mean(entropy.detach(), mb.mask)
        return {"train/loss": loss.detach(), **{f"train/{k}": v for k, v in stats.items()}}

    # -- checkpoints and export (validation and the optimizer: bound next to `rollout`) ----------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        online.save_checkpoint(self, checkpoint, "grpo_counters")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        online.load_checkpoint(self, checkpoint, "grpo_counters")

    def save_adapter(self, path: str | Path, tokenizer=None) -> Path:
        """Export the policy adapter in PEFT format to `path` (loadable by `PeftModel.from_pretrained`)."""
        return online.export_policy(self, path, tokenizer)
