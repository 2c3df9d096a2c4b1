"""RLHF with PPO and a KL penalty as a LightningModule (Ziegler et al. 2019; Stiennon et al. 2020; Huang et al.
2024, "The N+ implementation details of RLHF with PPO").

One ``training_step`` = one rollout batch of prompts followed by ``ppo.ppo_epochs`` passes of shuffled minibatch
updates (manual optimization). Every role (policy, reference, value, reward) is a LoRA adapter on ONE frozen base
(`lit_ft.roles`), so a PPO run holds the base weights once.

Run length: ``trainer.max_steps`` counts OPTIMIZER steps under manual optimization (about
``ppo_epochs * batch_size / (mini_batch_size * gradient_accumulation_steps)`` per rollout). Set the number of
rollouts with ``trainer.max_epochs`` x ``trainer.limit_train_batches`` (or the dataset size) and leave
``max_steps=-1``; the learning-rate schedule is stepped once per rollout and spans that many rollouts.
Do not set ``trainer.gradient_clip_val`` or ``accumulate_grad_batches``: use ``ppo.max_grad_norm`` and
``ppo.gradient_accumulation_steps``.
"""

from __future__ import annotations


import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft import checkpointing, metrics, optim, roles, rollout as decode, runs, strategies
from lit_ft.guards import check_weights_finite
from lit_ft.callbacks import log_table, resolve_callable
from lit_ft.errors import ConfigError
from lit_ft.generation import SamplingSpec
from lit_ft.optim import OptimSpec
from lit_ft.models import LoraSpec, ModelSpec, describe, eval_mode, load_tokenizer
from lit_ft.ppo_spec import PPOSpec, Rollout
from lit_ft.validation import check_init
from lit_ft.rl import compute_rewards, gae, kl_controller, kl_looks_wrong, masked_mean, masked_whiten, ppo_policy_loss, \
    ppo_value_loss, ratio_guard


def repeat_prompts(batch: dict, k: int) -> dict:
    """Each prompt row `k` times in a row (tensors along dim 0, lists element by element): k episodes a prompt."""
    if k == 1:
        return batch
    return {key: v.repeat_interleave(k, dim=0) if isinstance(v, Tensor) else [x for x in v for _ in range(k)]
            for key, v in batch.items()}


# Strategies PPO refuses, and why (checked in `setup`, before any model is built or moved).
_UNSUPPORTED_STRATEGIES = {
    "FSDPStrategy": "rollouts generate inside the training step, where FSDP cannot gather full parameters",
    "DeepSpeedStrategy": "measured on an H200 with ZeRO-2: the update (the policy's and the value adapter's backward "
                         "passes, then one step) ran without an error but left trainable weights unchanged",
}


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
    ):
        """
        Args:
            base: the frozen base model (dtype, quantization, gradient checkpointing).
            lora: LoRA of a new policy when there is no SFT adapter, and of a new value adapter without a reward adapter.
            sft_adapter: SFT adapter directory: the policy starts from it and a frozen copy is the reference.
                None: new LoRA policy, and the base without adapters is the reference.
            reward_adapter: reward export directory (SEQ_CLS LoRA + `score` head [+ reward_normalization.json]).
            reward_fn: dotted path of `fn(prompts, responses, answers) -> list[float]` on decoded texts
                (e.g. `lit_ft.tasks.correctness_reward`), added to the reward-model score times `reward_fn_weight`.
            reward_fn_weight: weight of `reward_fn` in the score.
            value_model: `adapter` (own LoRA + head, from the reward model when given) or `shared_trunk` (a head
                on the policy's hidden states; cheaper, but the value loss then also trains the policy adapter).
            sampling: rollout sampling (temperature also divides the logits of every log-prob).
            ppo: PPO hyper-parameters.
            optim: optimizer and learning-rate schedule (stepped once per rollout).
            sample_table_every: log a W&B table of prompts, responses and scores every this many rollouts (0: never).
        """
        check_init("model (PPOModule)", PPOModule, locals())
        super().__init__()
        self.save_hyperparameters()
        if reward_adapter is None and reward_fn is None:
            raise ValueError("PPOModule needs a reward: set reward_adapter and/or reward_fn")
        # Specs arrive as dataclasses (CLI, Python) or as the plain dicts a checkpoint stores (lit_ft.export).
        base, lora = checkpointing.as_spec(ModelSpec, base), checkpointing.as_spec(LoraSpec, lora)
        sampling, ppo = checkpointing.as_spec(SamplingSpec, sampling), checkpointing.as_spec(PPOSpec, ppo)
        self.base, self.lora, self.sampling, self.ppo = base, lora, sampling, ppo
        if ppo.samples_per_prompt < 1:
            raise ConfigError(f"model.ppo.samples_per_prompt: must be >= 1, got {ppo.samples_per_prompt}")
        self.optim = checkpointing.as_spec(OptimSpec, optim)
        self.sft_adapter = sft_adapter or base.adapter
        self.reward_adapter, self.value_model = reward_adapter, value_model
        self.reward_fn = resolve_callable(reward_fn) if reward_fn else None
        self.reward_fn_weight, self.sample_table_every = reward_fn_weight, sample_table_every
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable adapters and the value head only
        self.model = self.roles = self.tokenizer = self.sampler = None
        self.kl_ctl = kl_controller(ppo.adaptive_kl, ppo.init_kl_coef, ppo.target, ppo.horizon)
        self.counters = {"rollouts": 0, "skipped_batches": 0, "skipped_minibatches": 0}
        self.val_scores = MeanMetric()  # held-out greedy responses: the score and its parts (val/reward_model ...)
        parts = ["no_eos"] + ["reward_model"] * (reward_adapter is not None) + ["reward_fn"] * (reward_fn is not None)
        self.val_parts = torch.nn.ModuleDict({k: MeanMetric() for k in parts})

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = strategies.model_device(self, self.base)
        export = roles.read_reward_export(self.reward_adapter) if self.reward_adapter else None
        model, trainable = roles.build_roles(self.base, self.lora, self.sft_adapter, export, self.value_model, device)
        if self.ppo.disable_dropout:
            roles.disable_dropout(model)
        hidden = model.get_base_model().config.hidden_size
        self.reward_head, self.reward_norm = None, (1.0, 0.0)
        if export is not None:
            self.reward_head = roles.linear_head(hidden, export.head_weight, export.head_bias, trainable=False)
            self.reward_norm = (export.gain, export.bias)
        self.value_head = roles.value_head_from(export, hidden)
        self.model, self.roles = model, roles.AdapterRoles(model, trainable)
        self.sampler = None  # built at the first rollout, when the tokenizer is known (keeps its cache and graphs)
        self.tokenizer = getattr(getattr(self._trainer, "datamodule", None), "tokenizer", None) if self._trainer else None
        self.tokenizer = self.tokenizer or load_tokenizer(self.base.name_or_path, self.base.trust_remote_code)
        rank_zero_info(describe(model))

    def setup(self, stage: str) -> None:
        name = type(self.trainer.strategy).__name__
        if name in _UNSUPPORTED_STRATEGIES:
            raise ConfigError(
                f"trainer.strategy: PPO under {name.removesuffix('Strategy')} is not supported "
                f"({_UNSUPPORTED_STRATEGIES[name]}); use configs/strategies/ddp.yaml, where each rank rolls out its "
                "own prompts, with a 4-bit base (model.base.quantization nf4) for large models"
            )

    # -- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0 = time.perf_counter()
        # 1. Rollout: sample with the policy adapter (eval mode, KV cache); tokens after EOS are masked out.
        self.counters["rollouts"] += 1
        batch = repeat_prompts(batch, self.ppo.samples_per_prompt)
        ro = self.rollout(batch, self.sampling)
        # 2. Score prompt+response (reward adapter at the last real token and/or the reward callable).
        scores, texts, parts = self.score(batch, ro)
        # Decided on every rank alike: under DDP the update's gradient all-reduce needs all ranks.
        if not self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(scores).all()), all=True):
            self.counters["skipped_batches"] += 1
            self.log("ppo/skipped_batches", float(self.counters["skipped_batches"]))
            return None
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
        # 7. Log.
        stats.update({f"objective/{k}": v for k, v in parts.items()})
        stats.update({"objective/scores": scores.mean(), "objective/kl": seq_kl, "objective/kl_coef": kl_coef,
                      "objective/entropy": masked_mean(ro.entropy, ro.mask),
                      "ppo/returns/mean": masked_mean(ro.returns, ro.mask),
                      "ppo/response_length": ro.mask.sum(1).float().mean(),
                      "time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        self.log_dict({k: float(v) for k, v in stats.items()}, on_step=True, batch_size=len(ro.mask))
        self.maybe_log_table(batch["prompts"], texts, scores)
        return None

    @torch.no_grad()
    def rollout(self, batch: dict, sampling: SamplingSpec) -> Rollout:
        """Sample one response per prompt; with `min_new_tokens`, the batch's length is drawn uniformly."""
        n = sampling.max_new_tokens
        if sampling.min_new_tokens is not None:
            n = random.randint(sampling.min_new_tokens, sampling.max_new_tokens)
        if self.sampler is None:
            self.sampler = decode.Sampler(self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        with eval_mode(self.model), strategies.for_generation(self._trainer):
            responses, mask = self.sampler(batch["input_ids"], batch["attention_mask"], sampling, max_new_tokens=n)
        return Rollout(batch["input_ids"], batch["attention_mask"], responses, mask)

    @torch.no_grad()
    def score(self, batch: dict, ro: Rollout) -> tuple[Tensor, list[str], dict[str, Tensor]]:
        """Scores [B] (reward model, reward callable, EOS penalty, clipping), decoded responses, components."""
        # Only the masked tokens: whatever follows EOS is no part of the response.
        texts = self.tokenizer.batch_decode([r[m.bool()] for r, m in zip(ro.responses, ro.mask)], skip_special_tokens=True)
        scores, parts = torch.zeros(ro.mask.shape[0], device=ro.mask.device), {}
        if self.reward_head is not None:
            ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.mask)
            with eval_mode(self.model), self.roles.active(roles.REWARD):
                raw = self._chunked(lambda s: roles.last_token_scores(
                    self.reward_head, roles.trunk(self.model, ids[s], mask[s], pos[s]), mask[s]), len(ids))
            parts["reward_model"] = raw * self.reward_norm[0] + self.reward_norm[1]
            scores = scores + parts["reward_model"]
        if self.reward_fn is not None:
            values = self.reward_fn(batch["prompts"], texts, batch.get("answers") or [None] * len(texts))
            parts["reward_fn"] = torch.tensor(values, dtype=torch.float32, device=scores.device)
            scores = scores + self.reward_fn_weight * parts["reward_fn"]
        no_eos = ~((ro.responses == self.tokenizer.eos_token_id) & ro.mask.bool()).any(1)
        parts["no_eos"] = no_eos.float()
        if self.ppo.missing_eos_penalty is not None:
            scores = scores - self.ppo.missing_eos_penalty * no_eos.float()
        if self.ppo.score_clip is not None:
            scores = scores.clamp(-self.ppo.score_clip, self.ppo.score_clip)
        return scores, texts, {k: v.mean() for k, v in parts.items()}

    @torch.no_grad()
    def evaluate_rollout(self, ro: Rollout) -> None:
        """Fill old_logprobs, entropy, ref_logprobs and values, in eval mode, in chunks of mini_batch_size rows."""
        with eval_mode(self.model):
            pol = [self.policy_forward(ro.rows(s), entropy=True) for s in self._slices(len(ro.mask))]
            ro.old_logprobs, ro.entropy = torch.cat([p[0] for p in pol]), torch.cat([p[1] for p in pol])
            with self.roles.active(roles.REF):
                ro.ref_logprobs = torch.cat([self._logprobs(ro.rows(s))[0] for s in self._slices(len(ro.mask))])
            if self.roles.has_value_adapter:
                with self.roles.active(roles.VALUE):
                    ro.values = torch.cat([self.value_forward(ro.rows(s)) for s in self._slices(len(ro.mask))])
            else:
                ro.values = torch.cat([p[2] for p in pol])
        ro.old_logprobs = ro.old_logprobs * ro.mask  # post-EOS positions carry nothing
        ro.ref_logprobs = ro.ref_logprobs * ro.mask
        ro.values = ro.values * ro.mask

    def _logprobs(self, ro: Rollout, entropy: bool = False, values: bool = False):
        """(log-probs, entropy or None, shared-trunk values or None) with the currently active adapter."""
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.mask)
        h = roles.response_hidden(roles.trunk(self.model, ids, mask, pos), ro.input_ids.shape[1])
        lp, ent = roles.token_logprobs(self.model, h, ro.responses, self.sampling.temperature, entropy)
        return lp, ent, (roles.head_values(self.value_head, h) if values else None)

    def policy_forward(self, ro: Rollout, entropy: bool = False):
        with self.roles.active(roles.POLICY):
            return self._logprobs(ro, entropy, values=not self.roles.has_value_adapter)

    def value_forward(self, ro: Rollout) -> Tensor:
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.mask)
        h = roles.response_hidden(roles.trunk(self.model, ids, mask, pos), ro.input_ids.shape[1])
        return roles.head_values(self.value_head, h)

    def ppo_update(self, ro: Rollout) -> dict[str, Tensor]:
        """`ppo_epochs` x shuffled minibatches; returns the mean minibatch stats and the counters."""
        opt, p = self.optimizers(), self.ppo
        self.model.train()
        n, mbs, ga = len(ro.mask), p.mini_batch_size, p.gradient_accumulation_steps
        params = [q for group in opt.optimizer.param_groups for q in group["params"]]
        totals: dict[str, list[Tensor]] = {}
        epochs = 0
        # Under DDP, gradients are averaged once per optimizer step (not after each of the policy's and the value
        # adapter's backward passes, which touch different parameters).
        with strategies.manual_gradient_sync(self.trainer):
            for epochs in range(1, p.ppo_epochs + 1):
                order, epoch_kl = torch.randperm(n, device=ro.mask.device), []
                groups = [order[i : i + mbs] for i in range(0, n, mbs)]
                scales = self._token_scales(ro.mask, groups, ga)
                contributed = False
                for j, idx in enumerate(groups):
                    stats = self.minibatch_step(ro.rows(idx), scale=scales[j])
                    if stats is None:
                        self.counters["skipped_minibatches"] += 1
                    else:
                        contributed = True
                        epoch_kl.append(stats["ppo/policy/approxkl"])
                        for k, v in stats.items():
                            totals.setdefault(k, []).append(v)
                    if (j + 1) % ga == 0 or j + 1 == len(groups):
                        self._optimizer_step(opt, params, contributed)
                        contributed = False
                if p.target_kl is not None and self._mean_over_ranks(epoch_kl) > 1.5 * p.target_kl:
                    break  # TRL's former early stopping: KL above 1.5 x target_kl (every rank stops alike)
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        out = {k: torch.stack(v).mean() for k, v in totals.items()}
        out.update({"ppo/epochs": torch.tensor(float(epochs)),
                    "ppo/skipped_minibatches": torch.tensor(float(self.counters["skipped_minibatches"]))})
        return out

    def _optimizer_step(self, opt, params: list[Tensor], contributed: bool) -> None:
        """Average the gradients over the ranks (DDP), clip, step unless no rank back-propagated, zero."""
        if strategies.average_gradients(self.trainer, params, contributed):
            if self.ppo.max_grad_norm is not None:
                self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            check_weights_finite(self, opt)
        opt.zero_grad(set_to_none=True)

    def _token_scales(self, mask: Tensor, groups: list[Tensor], ga: int) -> Tensor:
        """Per-minibatch loss weights that make each optimizer step's losses token-weighted: a minibatch's token mean
        times its share of the response tokens of its accumulation group on all ranks (times the number of ranks,
        which `strategies.average_gradients` divides by again). One all-reduce per PPO epoch."""
        tokens = torch.stack([mask[idx].sum() for idx in groups]).to(torch.float32)
        step_of = torch.arange(len(groups), device=tokens.device) // ga
        per_step = torch.zeros(int(step_of[-1]) + 1, dtype=torch.float32, device=tokens.device)
        per_step = per_step.index_add_(0, step_of, tokens)  # fp32 explicitly: bf16-true makes bf16 the default
        per_step = self.trainer.strategy.reduce(per_step, reduce_op="sum")
        return tokens * self.trainer.world_size / per_step[step_of].clamp(min=1)

    def _mean_over_ranks(self, values: list[Tensor]) -> float:
        """Mean of every rank's `values` (one all-reduce under DDP; 0 when there are none)."""
        total = torch.zeros(2, device=self.device)
        if values:
            total[0], total[1] = torch.stack(values).sum(), len(values)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        return float(total[0] / total[1]) if total[1] > 0 else 0.0

    def minibatch_step(self, mb: Rollout, scale: float) -> dict[str, Tensor] | None:
        """Policy and value losses of one minibatch, back-propagated (each role's backward before switching)."""
        p = self.ppo
        logprobs, _, shared_values = self.policy_forward(mb)
        if p.ratio_threshold is not None and ratio_guard(logprobs, mb.old_logprobs, mb.mask, p.ratio_threshold):
            return None
        pg_loss, pg_stats = ppo_policy_loss(logprobs, mb.old_logprobs, mb.advantages, mb.mask, p.cliprange)
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

    def _slices(self, n: int) -> list[slice]:
        return [slice(i, i + self.ppo.mini_batch_size) for i in range(0, n, self.ppo.mini_batch_size)]

    def _chunked(self, fn, n: int) -> Tensor:
        return torch.cat([fn(s) for s in self._slices(n)])

    # -- validation, logging, optimizers ----------------------------------------------------------------------

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ro = self.rollout(batch, replace(self.sampling, do_sample=False, min_new_tokens=None))
        scores, _, parts = self.score(batch, ro)
        self.val_scores.update(scores)
        for k, v in parts.items():  # batch means, weighted by the batch's rows
            self.val_parts[k].update(v, weight=len(scores))

    def on_validation_epoch_start(self) -> None:
        metrics.fresh(self.val_scores, *self.val_parts.values())

    def on_validation_epoch_end(self) -> None:
        if self.val_scores.update_count:
            self.log("val/scores", self.val_scores.compute(), prog_bar=True)
            for k, m in self.val_parts.items():
                self.log(f"val/{k}", m.compute())
        for m in (self.val_scores, *self.val_parts.values()):
            m.reset()

    def maybe_log_table(self, prompts: list[str], texts: list[str], scores: Tensor) -> None:
        if not self.sample_table_every or (self.counters["rollouts"] - 1) % self.sample_table_every:
            return
        rows = [[p, t, float(s)] for p, t, s in zip(prompts, texts, scores.tolist())]
        log_table(self.trainer, "ppo/samples", ["prompt", "response", "score"], rows)

    def configure_optimizers(self):
        self.roles.restore_flags()
        # Stepped once per rollout: the schedule spans the rollouts (training batches) of the run.
        return optim.configure(self, self.optim, self.trainer.estimated_stepping_batches)

    # -- checkpoints and export -----------------------------------------------------------------------------

    configure_callbacks = runs.configure_callbacks  # exact resume, resume rules, run lock, preemption

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.roles.restore_flags()
        checkpointing.slim(self, checkpoint, self.base.identity(),
                           extra={"kl_controller": self.kl_ctl.state_dict(), "ppo_counters": dict(self.counters)})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.check_resume(self, checkpoint, self.base.identity())
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])
        self.counters.update(checkpoint.get("ppo_counters", {}))

    def save_adapter(self, path: str | Path, tokenizer=None) -> Path:
        """Export the policy adapter in PEFT format to `path` (and the value adapter + head to `path/value`)."""
        path = Path(path)
        roles.export_adapter(self.model, roles.POLICY, path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        checkpointing.write_base_identity(path, self.base.identity())
        roles.export_value(self.model, self.value_head, path / "value", self.roles.has_value_adapter)
        return path
