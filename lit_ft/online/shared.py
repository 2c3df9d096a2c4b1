"""What every online-RL stage (PPO, GRPO/RLOO) does alike, as functions over the LightningModule.

A stage module holds the same attributes (`model`, `roles`, `tokenizer`, `sampler`, `reward_head`, `reward_norm`,
`reward_fn`, `reward_fn_weight`, `sampling`, `base`, `lora`, `sft_adapter`, `reward_adapter`, `counters`,
`val_scores`, `val_parts`, `sample_table_every`) and calls these functions for the rollout (the decode engine via
`lit_ft.online.sampler.Sampler`), the scoring (reward adapter and/or a reward callable, the missing-EOS penalty), the
no-grad log-prob passes of the policy and the reference, the minibatch update loop with token- or row-weighted
gradients over accumulation and ranks, validation rollouts, the W&B sample table, checkpoints and the export.
Several are bound as methods (``rollout = online.rollout``), as `runs.configure_callbacks` is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft.train import checkpointing, metrics, optim, strategies

from lit_ft.errors import ConfigError
from lit_ft.losses import rollout_correction, rollout_mismatch

from lit_ft.online import episodes, roles, sampler as decode
from lit_ft.online.engine_ops import RolloutWeights
from lit_ft.online.generation import SamplingSpec
from lit_ft.online.scoring import resolve_callable
from lit_ft.train.metrics import log_table
from lit_ft.train.guards import check_weights_finite
from lit_ft.models import adapters
from lit_ft.models import LoraSpec, ModelSpec, compile_gradient_passes, describe, eval_mode, load_tokenizer
from lit_ft.train.optim import OptimSpec
from lit_ft.online.batch import Rollout, repeat_prompts, slices


def init_environment(module, environment, episodes_spec, sampling) -> None:
    """`model.environment` / `model.episodes` of an online stage (GRPO, PPO): the environment checked against the
    sampling settings and recorded in hparams as its class path and arguments (hparams.yaml stays plain YAML);
    call after `save_hyperparameters` and before `init_stage` (which then needs no reward: the episode's is one)."""
    if environment is not None:
        environment = episodes.check_environment(environment, checkpointing.as_spec(SamplingSpec, sampling))
        module.hparams["environment"] = episodes.describe(environment)
    module.environment, module.episodes = environment, checkpointing.as_spec(episodes.EpisodeSpec, episodes_spec)
    module.episode_stats = {}  # the last episodes' rollout/* figures (set by lit_ft.online.episodes.rollout)


def init_stage(module, base, lora, sft_adapter, reward_adapter, reward_fn, reward_fn_weight, sampling, optim_spec,
               sample_table_every, needs_reward: bool = True, compile: bool | None = None) -> None:
    """The `__init__` settings every online stage shares, as attributes (specs from dataclasses, or from the plain
    dicts a checkpoint stores: `lit_ft.cli.export`), manual optimization, the validation metrics, no model yet.
    `needs_reward` False: a stage that learns from something else (distillation's teacher). `compile`: the decoder
    layers compiled in the update's gradient passes (`build_roles`); None leaves it to `--memory auto`."""
    needs_reward = needs_reward and getattr(module, "environment", None) is None
    if needs_reward and reward_adapter is None and reward_fn is None:
        raise ValueError(f"{type(module).__name__} needs a reward: set reward_adapter and/or reward_fn")
    module.base, module.lora = checkpointing.as_spec(ModelSpec, base), checkpointing.as_spec(LoraSpec, lora)
    module.sampling, module.optim = checkpointing.as_spec(SamplingSpec, sampling), checkpointing.as_spec(OptimSpec,
                                                                                                          optim_spec)
    module.sft_adapter, module.reward_adapter = sft_adapter or module.base.adapter, reward_adapter
    module.reward_fn = resolve_callable(reward_fn) if reward_fn else None
    module.reward_fn_name = reward_fn
    module.reward_fn_weight, module.sample_table_every = reward_fn_weight, sample_table_every
    module.automatic_optimization = False
    module.compile_layers = compile  # not `module.compile`: that would hide nn.Module.compile
    module.strict_loading = False  # checkpoints hold the trainable adapters (and PPO's value head) only
    module.model = module.roles = module.tokenizer = module.sampler = None
    validation_metrics(module, reward_adapter, reward_fn)  # held-out greedy responses: val/scores and its parts


def validation_metrics(module, reward_adapter: str | None, reward_fn: str | None) -> None:
    """`val_scores` (held-out greedy responses' score) and `val_parts` (its parts: no_eos, reward_model, reward_fn)."""
    module.val_scores = MeanMetric()
    parts = ["no_eos"] + ["reward_model"] * (reward_adapter is not None) + ["reward_fn"] * (reward_fn is not None) \
        + ["environment"] * (getattr(module, "environment", None) is not None)
    module.val_parts = torch.nn.ModuleDict({k: MeanMetric() for k in parts})


# ---------------------------------------------------------------------------------------------- model


def build_roles(module, value_model: str, disable_dropout: bool, frozen: dict[str, tuple[str, str]] | None = None):
    """Build the one base with its adapters (`lit_ft.online.roles`; `frozen`: more frozen adapters by role) on the
    module, the frozen reward head and the tokenizer; returns the reward export (or None). Idempotence is the
    caller's (`configure_model`)."""
    device = strategies.model_device(module, module.base)
    export = (adapters.read_reward_export(module.reward_adapter, module.base.identity()) if module.reward_adapter
              else None)
    model, trainable = roles.build_roles(module.base, module.lora, module.sft_adapter, export, value_model, device,
                                         frozen)
    if disable_dropout:
        roles.disable_dropout(model)
    hidden = model.get_base_model().config.hidden_size
    module.reward_head, module.reward_norm = None, (1.0, 0.0)
    if export is not None:
        module.reward_head = roles.linear_head(hidden, export.head_weight, export.head_bias, trainable=False)
        module.reward_norm = (export.gain, export.bias)
    module.model, module.roles = model, roles.AdapterRoles(model, trainable)
    sampling = getattr(module, "sampling", None)
    if sampling is not None and sampling.engine == "static":  # now, not at the first rollout after validation
        trainer = module._trainer
        reason = decode.engine_unsupported(model) or (decode.precision_mismatch(model, trainer.precision)
                                                      if trainer is not None else None)
        if reason is not None:
            raise ConfigError(f"model.sampling.engine: static cannot serve this model ({reason}); use hf or auto")
    if sampling is not None and (sampling.merged or sampling.dequantize):
        reason = RolloutWeights.refusal(model, roles.POLICY, merge=sampling.merged)
        if reason is not None:
            raise ConfigError(f"model.sampling.{'merged' if sampling.merged else 'dequantize'}: {reason}; set it false")
    if getattr(module, "compile_layers", False):
        compile_gradient_passes(model, eager_on_error=getattr(module, "compile_planned", False))
    module.sampler = None  # built at the first rollout, when the tokenizer is known (keeps its cache and graphs)
    trainer = module._trainer
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None) if trainer else None
    module.tokenizer = tokenizer or load_tokenizer(module.base.name_or_path, module.base.trust_remote_code)
    rank_zero_info(describe(model))
    return export


# ---------------------------------------------------------------------------------------------- rollout, score


def sample_and_score(module, batch: dict, k: int, skipped_key: str):
    """Steps 1 and 2 of a training step: each prompt `k` times (side by side), the rollout with the policy, the
    scores (`module.score`). Returns (batch, rollout, scores, texts, score parts), or None when a score is not
    finite on some rank: then every rank skips the batch alike (the update's all-reduce needs all ranks), counted in
    `counters["skipped_batches"]` and logged under `skipped_key`."""
    module.counters["rollouts"] += 1
    batch = repeat_prompts(batch, k)
    ro = module.rollout(batch, module.sampling)
    scores, texts, parts = module.score(batch, ro)
    if not module.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(scores).all()), all=True):
        module.counters["skipped_batches"] += 1
        module.log(skipped_key, float(module.counters["skipped_batches"]))
        return None
    return batch, ro, scores, texts, parts


@torch.no_grad()
def rollout(module, batch: dict, sampling: SamplingSpec, logprobs: bool = True) -> Rollout:
    """Sample one response per prompt row; with `min_new_tokens`, the batch's length is drawn uniformly. With
    `logprobs`, the rollout carries the sampler's log-probs of its tokens (`Rollout.sampler_logprobs`). A module
    with an `environment` runs multi-turn episodes instead (`lit_ft.online.episodes.rollout`)."""
    if getattr(module, "environment", None) is not None:
        return episodes.rollout(module, batch, sampling, logprobs)
    n = sampling.max_new_tokens
    if sampling.min_new_tokens is not None:
        n = random.randint(sampling.min_new_tokens, sampling.max_new_tokens)
    if module.sampler is None:
        module.sampler = decode.Sampler(module.model, module.tokenizer.eos_token_id, module.tokenizer.pad_token_id)
    with eval_mode(module.model), strategies.for_generation(module._trainer):
        responses, mask, *logp = module.sampler(batch["input_ids"], batch["attention_mask"], sampling,
                                                max_new_tokens=n, logprobs=logprobs)
    return Rollout(batch["input_ids"], batch["attention_mask"], responses, mask,
                   sampler_logprobs=logp[0] if logp else None)


def no_eos(module, ro: Rollout) -> Tensor:
    """[B] bool: responses that never emit EOS (cut at the length limit); episodes: whose final model turn was cut."""
    if ro.attend is not None:
        return torch.tensor([not t or t[-1] != module.tokenizer.eos_token_id for t in episodes.last_turn(ro)],
                            device=ro.mask.device)
    return ~((ro.responses == module.tokenizer.eos_token_id) & ro.mask.bool()).any(1)


@torch.no_grad()
def score(module, batch: dict, ro: Rollout, missing_eos_penalty: float | None, score_clip: float | None,
          chunk: int) -> tuple[Tensor, list[str], dict[str, Tensor]]:
    """Scores [B] (reward model, reward callable, EOS penalty, clipping), decoded responses, components."""
    # Only the masked tokens: whatever follows EOS is no part of the response.
    # Episodes: the model's final turn (the environment's turns and the earlier calls are no part of the answer).
    tokens = ([r[m.bool()] for r, m in zip(ro.responses, ro.mask)] if ro.attend is None else episodes.last_turn(ro))
    texts = module.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    scores, parts = torch.zeros(ro.mask.shape[0], device=ro.mask.device), {}
    if module.reward_head is not None:
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.visible)
        with eval_mode(module.model), module.roles.active(roles.REWARD):
            raw = torch.cat([roles.last_token_scores(module.reward_head, roles.trunk(module.model, ids[s], mask[s],
                             pos[s]), mask[s]) for s in slices(len(ids), chunk)])
        parts["reward_model"] = raw * module.reward_norm[0] + module.reward_norm[1]
        scores = scores + parts["reward_model"]
    if module.reward_fn is not None:
        values = module.reward_fn(batch["prompts"], texts, batch.get("answers") or [None] * len(texts))
        parts["reward_fn"] = torch.tensor(values, dtype=torch.float32, device=scores.device)
        scores = scores + module.reward_fn_weight * parts["reward_fn"]
    if ro.env_rewards is not None:
        parts["environment"] = ro.env_rewards
        scores = scores + ro.env_rewards
    parts["no_eos"] = no_eos(module, ro).float()
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * parts["no_eos"]
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores, texts, {k: v.mean() for k, v in parts.items()}


def logprobs(module, ro: Rollout, entropy: bool = False, value_head=None):
    """(log-probs, entropy or None, `value_head`'s values on the same hidden states or None) with the currently
    active adapter."""
    ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.visible)
    h = roles.response_hidden(roles.trunk(module.model, ids, mask, pos), ro.input_ids.shape[1])
    lp, ent = roles.token_logprobs(module.model, h, ro.responses, module.sampling.temperature, entropy)
    return lp, ent, (roles.head_values(value_head, h) if value_head is not None else None)


@torch.no_grad()
def old_and_ref_logprobs(module, ro: Rollout, chunk: int, value_head=None, policy: bool = True,
                         reference: bool = True) -> Tensor | None:
    """Fill `old_logprobs` and `entropy` (policy) and `ref_logprobs` (reference), 0 after EOS, in eval mode and in
    chunks of `chunk` rows; returns `value_head`'s values from the policy pass (unmasked) when one is given.
    `policy` / `reference` False skip that pass (its fields stay None)."""
    with eval_mode(module.model):
        if policy:
            with module.roles.active(roles.POLICY):
                pol = [logprobs(module, ro.rows(s), True, value_head) for s in slices(len(ro.mask), chunk)]
            ro.old_logprobs, ro.entropy = torch.cat([p[0] for p in pol]), torch.cat([p[1] for p in pol])
            ro.old_logprobs = ro.old_logprobs * ro.mask  # post-EOS positions carry nothing
        if reference:
            with module.roles.active(roles.REF):
                ro.ref_logprobs = torch.cat([logprobs(module, ro.rows(s))[0] for s in slices(len(ro.mask), chunk)])
            ro.ref_logprobs = ro.ref_logprobs * ro.mask
    return torch.cat([p[2] for p in pol]) if policy and value_head is not None else None


# ---------------------------------------------------------------------------------------------- sampler mismatch


def correction_weights(mb: Rollout, old_logprobs: Tensor, setting: str, mode: str, cap: float) -> Tensor | None:
    """A minibatch's rollout-correction weights [B, R] (`lit_ft.losses.rollout_correction`: the no-grad training
    forward's log-probs `old_logprobs` against the sampler's), None under `none`. `setting` is the key the error
    names when the rollout carries no sampler log-probs (both engines supply them)."""
    if mode == "none":
        return None
    if mb.sampler_logprobs is None:
        raise ConfigError(f"{setting}={mode}: the rollout carries no sampler log-probs to weigh the policy loss with "
                          f"(both decode engines supply them); set {setting}: none")
    return rollout_correction(old_logprobs, mb.sampler_logprobs, mb.mask, mode, cap)


def mismatch_stats(sampler_logprobs: Tensor | None, train_logprobs: Tensor | None, mask: Tensor, mode: str = "none",
                   cap: float = 2.0) -> dict[str, Tensor]:
    """The `rollout/*` figures of a rollout (`lit_ft.losses.rollout_mismatch`): the sampler's log-probs against the
    training forward's of the same tokens under the same weights, and the correction's weights (`mode`; distillation
    has no correction); nothing without both or without rows."""
    if sampler_logprobs is None or train_logprobs is None or not len(mask):
        return {}
    return {f"rollout/{k}": v for k, v in rollout_mismatch(sampler_logprobs, train_logprobs, mask, mode, cap).items()}


# ---------------------------------------------------------------------------------------------- update


def update(module, ro: Rollout, epochs: int, mbs: int, ga: int, weights: Tensor,
           step: Callable[[Rollout, Tensor], dict | None], max_grad_norm: float | None,
           early_stop: Callable[[list[dict]], bool] | None = None, min_groups: int = 1) -> tuple[dict, int]:
    """`epochs` passes of shuffled minibatches of `mbs` rows, an optimizer step every `ga` of them; the schedule is
    stepped once afterwards. `step(minibatch, scale)` back-propagates `loss * scale` and returns its stats (None:
    skipped, counted in `counters["skipped_minibatches"]`); `weights` [B] (tokens or 1 a row) make each optimizer
    step's loss the weighted mean over its rows on all ranks (`count_scales`). `min_groups`: minibatches per pass
    at least (empty ones on a rank with fewer rows, so every rank takes the same optimizer steps).
    Returns (the mean of every stat over the minibatches, passes run)."""
    opt = module.optimizers()
    module.model.train()
    n = len(ro.mask)
    params = [q for group in opt.optimizer.param_groups for q in group["params"]]
    totals: dict[str, list[Tensor]] = {}
    done = 0
    # Under DDP, gradients are averaged once per optimizer step (not after each backward pass: PPO's policy and
    # value adapter backward over different parameters; a GRPO rank may have no rows to back-propagate).
    with strategies.manual_gradient_sync(module.trainer):
        for done in range(1, epochs + 1):
            order, seen = torch.randperm(n, device=ro.mask.device), []
            groups = [order[i : i + mbs] for i in range(0, n, mbs)]
            groups += [order[:0]] * (min_groups - len(groups))
            scales = count_scales(module.trainer, weights, groups, ga)
            contributed = False
            for j, idx in enumerate(groups):
                stats = step(ro.rows(idx), scales[j]) if len(idx) else None
                if stats is None and len(idx):
                    module.counters["skipped_minibatches"] += 1
                elif stats is not None:
                    contributed = True
                    seen.append(stats)
                    for k, v in stats.items():
                        totals.setdefault(k, []).append(v)
                if (j + 1) % ga == 0 or j + 1 == len(groups):
                    optimizer_step(module, opt, params, contributed, max_grad_norm)
                    contributed = False
            if early_stop is not None and early_stop(seen):
                break
    sched = module.lr_schedulers()
    if sched is not None:
        sched.step()
    return {k: torch.stack(v).mean() for k, v in totals.items()}, done


def optimizer_step(module, opt, params: list[Tensor], contributed: bool, max_grad_norm: float | None) -> None:
    """Average the gradients over the ranks (DDP), clip, step unless no rank back-propagated, zero."""
    if strategies.average_gradients(module.trainer, params, contributed):
        if max_grad_norm is not None:
            module.clip_gradients(opt, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        check_weights_finite(module, opt)
    opt.zero_grad(set_to_none=True)


def count_scales(trainer, weights: Tensor, groups: list[Tensor], ga: int) -> Tensor:
    """Per-minibatch loss weights that make each optimizer step's loss weighted by `weights` (response tokens, or
    1 a row): a minibatch's weighted mean times its share of the weight of its accumulation group on all ranks
    (times the number of ranks, which `strategies.average_gradients` divides by again; the rule of
    `guards.CountWeighting`). One all-reduce per pass."""
    tokens = torch.stack([weights[idx].sum() for idx in groups]).to(torch.float32)
    step_of = torch.arange(len(groups), device=tokens.device) // ga
    # fp32 explicitly: under bf16-true Lightning makes bf16 the default dtype (index_add_ then refuses fp32 counts)
    per_step = torch.zeros(int(step_of[-1]) + 1, dtype=torch.float32, device=tokens.device)
    per_step = per_step.index_add_(0, step_of, tokens)
    per_step = trainer.strategy.reduce(per_step, reduce_op="sum")
    return tokens * trainer.world_size / per_step[step_of].clamp(min=1)


def mean_over_ranks(module, values: list[Tensor]) -> float:
    """Mean of every rank's `values` (one all-reduce under DDP; 0 when there are none)."""
    total = torch.zeros(2, dtype=torch.float32, device=module.device)
    if values:
        total[0], total[1] = torch.stack(values).sum(), len(values)
    total = module.trainer.strategy.reduce(total, reduce_op="sum")
    return float(total[0] / total[1]) if total[1] > 0 else 0.0


# ---------------------------------------------------------------------------------------------- validation, logs


def validation_step(module, batch: dict, batch_idx: int) -> None:
    """Greedy responses to held-out prompts, scored as in training: `val/scores` and its parts."""
    ro = module.rollout(batch, replace(module.sampling, do_sample=False, min_new_tokens=None), logprobs=False)
    scores, _, parts = module.score(batch, ro)
    module.val_scores.update(scores)
    for k, v in parts.items():  # batch means, weighted by the batch's rows
        module.val_parts[k].update(v, weight=len(scores))


def on_validation_epoch_start(module) -> None:
    metrics.fresh(module.val_scores, *module.val_parts.values())


def on_validation_epoch_end(module, key: str = "val/scores") -> None:
    """Log the validation means (`module.val_scores` under `key`, each of `module.val_parts` under `val/<name>`)."""
    if module.val_scores.update_count:
        module.log(key, module.val_scores.compute(), prog_bar=True)
        for k, m in module.val_parts.items():
            module.log(f"val/{k}", m.compute())
    for m in (module.val_scores, *module.val_parts.values()):
        m.reset()


def log_samples(module, key: str, prompts: list[str], texts: list[str], scores: Tensor) -> None:
    """A W&B table of prompts, responses and scores every `sample_table_every` rollouts (0: never)."""
    if not module.sample_table_every or (module.counters["rollouts"] - 1) % module.sample_table_every:
        return
    rows = [[p, t, float(s)] for p, t, s in zip(prompts, texts, scores.tolist())]
    log_table(module.trainer, key, ["prompt", "response", "score"], rows)


def configure_optimizers(module):
    module.roles.restore_flags()
    # Stepped once per rollout: the schedule spans the rollouts (training batches) of the run.
    return optim.configure(module, module.optim, module.trainer.estimated_stepping_batches)


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(module, checkpoint: dict, counters_key: str, extra: dict | None = None) -> None:
    """Trainable state only, the counters under `counters_key`, `extra` entries; sealed (the last step)."""
    module.roles.restore_flags()
    checkpointing.slim(module, checkpoint, module.base.identity(),
                       extra={**(extra or {}), counters_key: dict(module.counters)})


def load_checkpoint(module, checkpoint: dict, counters_key: str) -> None:
    checkpointing.check_resume(module, checkpoint, module.base.identity())
    module.counters.update(checkpoint.get(counters_key, {}))


def export_policy(module, path: str | Path, tokenizer=None) -> Path:
    """The policy adapter in PEFT format at `path` (+ the tokenizer, the base's identity)."""
    path = Path(path)
    roles.export_adapter(module.model, roles.POLICY, path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    checkpointing.write_base_identity(path, module.base.identity())
    return path
