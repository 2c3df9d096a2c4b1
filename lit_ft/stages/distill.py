"""On-policy distillation as a LightningModule: GKD (Agarwal et al. 2024, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes").

One ``training_step`` = one batch of prompts: with probability ``distill.lmbda`` the student (the policy LoRA)
samples a response to each (the shared rollout, `lit_ft.online.shared.rollout`), else the batch's own responses are
used; the frozen teacher's no-grad pass keeps its final hidden states of every response token; then minibatch
updates of the per-token generalised JSD between the two next-token distributions over the whole vocabulary
(`lit_ft.losses.chunked_generalized_jsd`), masked to the response tokens and token-averaged per optimizer step
(`lit_ft.online.shared.update`). The teacher is either another adapter of the student's own base (the roles pattern:
`teacher_adapter`, a frozen adapter ``teacher`` beside the ``policy``) or a separate frozen model (`teacher`, loaded
like the base, optionally quantized) whose tokenizer must be the student's. Rollouts, the optimizer, the update loop,
checkpoints and the export are the online stages' own functions.

Run length: ``trainer.max_epochs`` x ``trainer.limit_train_batches`` steps of prompts, as for GRPO.
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft.errors import ConfigError
from lit_ft.losses import chunked_generalized_jsd, masked_mean
from lit_ft.models import LoraSpec, ModelSpec, eval_mode, families, load_tokenizer
from lit_ft.models.load import load_base
from lit_ft.online import checks, roles, shared as online
from lit_ft.online.batch import Rollout, slices
from lit_ft.online.generation import SamplingSpec
from lit_ft.stages.distill_spec import DistillSpec
from lit_ft.train import checkpointing, optim, runs, strategies
from lit_ft.validation import check_init


def check_vocabulary(student, teacher, student_name: str, teacher_name: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's in size or special tokens: the loss compares the
    two next-token distributions id by id."""
    def shape(tok):
        return len(tok), {k: (getattr(tok, k), getattr(tok, f"{k}_id")) for k in ("bos_token", "eos_token",
                                                                                   "pad_token", "unk_token")}
    (n_s, sp_s), (n_t, sp_t) = shape(student), shape(teacher)
    if n_s != n_t or sp_s != sp_t:
        raise ConfigError(
            f"model.teacher: the teacher's tokenizer ({teacher_name}: {n_t} tokens, {sp_t}) differs from the "
            f"student's ({student_name}: {n_s} tokens, {sp_s}); distillation compares next-token distributions id "
            "by id, so both need one vocabulary")


class DistillModule(L.LightningModule):
    """GKD: a LoRA student learns a frozen teacher's next-token distributions on its own samples."""

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        sft_adapter: str | None = None,
        lora: LoraSpec | None = LoraSpec(),
        teacher: ModelSpec | None = None,
        teacher_adapter: str | None = None,
        distill: DistillSpec = DistillSpec(),
        sampling: SamplingSpec = SamplingSpec(),
        optim: optim.OptimSpec = optim.OptimSpec(lr=1e-4, scheduler="constant", warmup_ratio=0.0),
        sample_table_every: int = 10,
        compile: bool | None = None,
    ):
        """
        Args:
            base: the student's frozen base model (dtype, quantization, gradient checkpointing).
            sft_adapter: the student starts as a trainable copy of this adapter; None: a new LoRA (`lora`).
            lora: LoRA of a new student when there is no SFT adapter.
            teacher: a separate frozen teacher model (hub id, local directory, or null name = the bundled default;
                optionally quantized), with the student's tokenizer. Exactly one of `teacher`, `teacher_adapter`.
            teacher_adapter: an exported adapter of the student's own base as the teacher (self-distillation from a
                trained adapter): a frozen adapter beside the student on one base.
            distill: the divergence (beta), on-policy share (lmbda), temperature, chunks and the update's shape.
            sampling: the student's sampling of responses (and of the validation responses, greedy).
            optim: optimizer and learning-rate schedule (stepped once per training step).
            sample_table_every: log a W&B table of prompts, responses and divergences every this many steps (0: never).
            compile: `torch.compile` each decoder layer in the student's gradient passes only (sampling and the
                teacher's passes run eagerly: `compile_gradient_passes`). None (the default): `--memory auto` (the
                default of `lit-ft fit`) decides: on a GPU and an unquantized base, on when the run has rollouts
                enough for the faster updates to pay for compiling (about 100 s; `lit_ft.plan.auto`), else off;
                true/false fix it.
        """
        check_init("model (DistillModule)", DistillModule, locals())
        super().__init__()
        self.save_hyperparameters()
        checkpointing.yaml_safe_hparams(self)
        if (teacher is None) == (teacher_adapter is None):
            raise ConfigError(f"model.teacher={teacher!r}, model.teacher_adapter={teacher_adapter!r}: set exactly one "
                              "(a separate teacher model, or an adapter of the student's base as the teacher)")
        online.init_stage(self, base, lora, sft_adapter, None, None, 1.0, sampling, optim, sample_table_every,
                          needs_reward=False, compile=compile)
        self.distill = checkpointing.as_spec(DistillSpec, distill)
        self.teacher_spec = checkpointing.as_spec(ModelSpec, teacher) if teacher is not None else None
        self.teacher_adapter = teacher_adapter
        self.__dict__["teacher_model"] = None  # frozen, not a submodule: never in a checkpoint, never trained
        self.val_scores = MeanMetric()  # val/loss: the divergence on greedy responses, token-weighted
        self.val_parts = torch.nn.ModuleDict({"teacher_student_kl": MeanMetric(), "completions/mean_length": MeanMetric()})
        self.counters = {"rollouts": 0, "on_policy": 0, "skipped_batches": 0, "skipped_minibatches": 0}
        self.on_policy_seen: list[tuple[Tensor, Tensor, Tensor]] = []  # (sampler, loss pass's, mask) a minibatch

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        frozen = {roles.TEACHER: (self.teacher_adapter, "model.teacher_adapter")} if self.teacher_adapter else None
        online.build_roles(self, "none", self.distill.disable_dropout, frozen)
        self.head_has_lora = any("lora_" in n and ".lm_head." in n for n, _ in self.model.named_parameters())
        if self.teacher_spec is not None:
            t = self.teacher_spec
            check_vocabulary(self.tokenizer, load_tokenizer(t.name_or_path, t.trust_remote_code),
                             self.base.name_or_path or "the bundled default", t.name_or_path or "the bundled default")
            model = load_base(t, "causal_lm", strategies.model_device(self, t)).requires_grad_(False).eval()
            if self.distill.disable_dropout:
                roles.disable_dropout(model)
            self.__dict__["teacher_model"] = model

    def setup(self, stage: str) -> None:
        checks.setup(self, stage, "distillation")
        rows = getattr(getattr(self.trainer, "datamodule", None), "train_dataset", None)
        if stage == "fit" and self.distill.lmbda < 1 and rows is not None and "completion" not in rows.column_names:
            self.no_responses()

    def no_responses(self):
        raise ConfigError(f"model.distill.lmbda={self.distill.lmbda}: the steps off the student's samples train on "
                          "the data's own responses, but the training prompts carry none (PromptDataModule reads "
                          "prompts only); set model.distill.lmbda: 1")

    # -- training -------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> None:
        t0, d = time.perf_counter(), self.distill
        # 1. Responses: the student's own samples (probability lmbda), else the batch's own responses.
        self.counters["rollouts"] += 1
        on_policy = d.lmbda >= 1 or random.random() < d.lmbda
        ro = self.rollout(batch, self.sampling) if on_policy else self.given_responses(batch)
        self.counters["on_policy"] += int(on_policy)
        # 2. The teacher's no-grad pass: its final hidden states of every response token.
        self.teacher_pass(ro)
        t1 = time.perf_counter()
        # 3. Minibatch updates of the per-token divergence, token-averaged per optimizer step on all ranks.
        self.on_policy_seen = []
        stats, _ = online.update(self, ro, 1, d.mini_batch_size, d.gradient_accumulation_steps, ro.mask.sum(1),
                                 self.minibatch_step, d.max_grad_norm)
        # 4. Log (the sampler/trainer mismatch under rollout/, as PPO's and GRPO's).
        stats.update(self.mismatch())
        stats.update({"train/completions/mean_length": ro.mask.sum(1).float().mean(),
                      "train/completions/clipped_ratio": online.no_eos(self, ro).float().mean(),
                      "train/on_policy": torch.tensor(float(on_policy)),
                      "time/rollout": t1 - t0, "time/update": time.perf_counter() - t1})
        self.log_dict({k: float(v) for k, v in stats.items()}, on_step=True, batch_size=len(ro.mask))
        if self.sample_table_every and (self.counters["rollouts"] - 1) % self.sample_table_every == 0:
            texts = self.tokenizer.batch_decode([r[m.bool()] for r, m in zip(ro.responses, ro.mask)],
                                                skip_special_tokens=True)
            with torch.no_grad():
                div = self.divergence(ro)[0]
            online.log_samples(self, "train/completions", batch["prompts"], texts, div)
        return None

    rollout = online.rollout
    configure_optimizers, configure_callbacks = online.configure_optimizers, runs.configure_callbacks
    load_state_dict = checkpointing.load_trainable  # the frozen base and teacher are not 'missing' from a checkpoint

    def given_responses(self, batch: dict) -> Rollout:
        """The batch's own responses (`completions`: texts), tokenized with EOS, cut at max_new_tokens, right-padded."""
        if "completions" not in batch:
            self.no_responses()
        eos, pad, n = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, self.sampling.max_new_tokens
        ids = [(x + [eos])[:n] for x in self.tokenizer(list(batch["completions"]), add_special_tokens=False)["input_ids"]]
        width = max(len(x) for x in ids)
        responses = torch.tensor([x + [pad] * (width - len(x)) for x in ids], device=batch["input_ids"].device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=responses.device)
        return Rollout(batch["input_ids"], batch["attention_mask"], responses, mask)

    @torch.no_grad()
    def teacher_pass(self, ro: Rollout) -> None:
        """`ro.teacher_hidden` [B, R, Ht]: the teacher's final hidden states predicting each response token."""
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.mask)
        p, out = ro.input_ids.shape[1], []
        for s in slices(len(ids), self.distill.mini_batch_size):
            if self.teacher_model is not None:
                with eval_mode(self.teacher_model):
                    h = self.teacher_model.get_decoder()(input_ids=ids[s], attention_mask=mask[s], position_ids=pos[s],
                                                         use_cache=False).last_hidden_state
            else:
                with eval_mode(self.model), self.roles.active(roles.TEACHER):
                    h = roles.trunk(self.model, ids[s], mask[s], pos[s])
            out.append(roles.response_hidden(h, p))
        ro.teacher_hidden = torch.cat(out)

    def logit_fns(self):
        """(student, teacher, width): functions from final hidden states to logits, the student's of its whole head,
        the teacher's cut to `width`, the entries the divergence compares (a padded vocabulary is cut to the narrower
        of the two heads; the tokenizers are the same)."""
        width = self.model.get_output_embeddings().weight.shape[0]
        if self.teacher_model is not None:
            width = min(width, self.teacher_model.get_output_embeddings().weight.shape[0])

        def teacher(h: Tensor) -> Tensor:
            with torch.no_grad():
                if self.teacher_model is not None:
                    return families.lm_logits(self.teacher_model, h)[..., :width]
                if not self.head_has_lora:  # the head is the base's alone, whichever adapter is active
                    return families.lm_logits(self.model, h)[..., :width]
                with self.roles.active(roles.TEACHER):
                    return families.lm_logits(self.model, h)[..., :width]

        return (lambda h: families.lm_logits(self.model, h)), teacher, width

    def divergence(self, ro: Rollout, token_logprobs: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Per-row token means [B] of the divergence (with grad) and of KL(student || teacher), the [B, R] per
        token divergence, under the student (the active policy adapter), and with `token_logprobs` the student's
        log-probs [B, R] of the response tokens at the sampling temperature (no grad, 0 outside the mask: from the
        logits the divergence makes, `chunked_generalized_jsd(targets=...)`; else None)."""
        ids, mask, pos = roles.sequence(ro.input_ids, ro.attention_mask, ro.responses, ro.mask)
        h = roles.response_hidden(roles.trunk(self.model, ids, mask, pos), ro.input_ids.shape[1])
        keep = ro.mask.bool()
        student, teacher, width = self.logit_fns()
        d = self.distill
        jsd, kl, lp = chunked_generalized_jsd(h[keep], ro.teacher_hidden[keep], student, teacher, d.beta,
                                              d.temperature, d.logits_chunk_size, width,
                                              ro.responses[keep] if token_logprobs else None,
                                              self.sampling.temperature)
        per_token = h.new_zeros(ro.mask.shape, dtype=jsd.dtype).masked_scatter(keep, jsd)
        kl_token = h.new_zeros(ro.mask.shape, dtype=kl.dtype).masked_scatter(keep, kl)
        if lp is not None:
            lp = lp.new_zeros(ro.mask.shape).masked_scatter(keep, lp)
        n = ro.mask.sum(1).clamp(min=1)
        return per_token.sum(1) / n, kl_token.sum(1) / n, per_token, lp

    def minibatch_step(self, mb: Rollout, scale: Tensor) -> dict[str, Tensor]:
        """The divergence's token mean over one minibatch, back-propagated times `scale`. The minibatches of the
        first optimizer step (the weights that sampled) keep the sampler's and the loss pass's log-probs of their
        tokens for the mismatch figures (`mismatch`)."""
        record = mb.sampler_logprobs is not None and len(self.on_policy_seen) < self.distill.gradient_accumulation_steps
        with self.roles.active(roles.POLICY):
            _, kl, per_token, lp = self.divergence(mb, token_logprobs=record)
        if record:
            self.on_policy_seen.append((mb.sampler_logprobs, lp, mb.mask))
        loss = masked_mean(per_token, mb.mask)
        self.manual_backward(loss * scale)
        return {"train/loss": loss.detach(), "train/teacher_student_kl": masked_mean(
            kl[:, None].expand_as(mb.mask), mb.mask)}

    def mismatch(self) -> dict[str, Tensor]:
        """The `rollout/*` figures of an on-policy step (`lit_ft.online.shared.mismatch_stats`, as PPO's and GRPO's):
        the sampler's log-probs of the response tokens against the student's of the loss's own forward, over the
        rows of the update's first optimizer step (later ones see updated weights); none on a step off the batch's
        own responses."""
        seen, self.on_policy_seen = self.on_policy_seen, []
        if not seen:
            return {}
        sampler, train, mask = (torch.cat(t) for t in zip(*seen))
        return online.mismatch_stats(sampler, train, mask)

    # -- validation: the divergence on greedy responses ------------------------------------------------------

    @torch.no_grad()
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        ro = self.rollout(batch, replace(self.sampling, do_sample=False, min_new_tokens=None), logprobs=False)
        self.teacher_pass(ro)
        with eval_mode(self.model):
            loss, kl, *_ = self.divergence(ro)
        n = ro.mask.sum(1).float()
        self.val_scores.update(loss, weight=n)
        self.val_parts["teacher_student_kl"].update(kl, weight=n)
        self.val_parts["completions/mean_length"].update(n)

    on_validation_epoch_start = online.on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        online.on_validation_epoch_end(self, "val/loss")  # val_scores holds the divergence here

    # -- checkpoints and export -------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        online.save_checkpoint(self, checkpoint, "distill_counters")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        online.load_checkpoint(self, checkpoint, "distill_counters")

    def save_adapter(self, path: str | Path, tokenizer=None) -> Path:
        """Export the student adapter in PEFT format to `path` (loadable by `PeftModel.from_pretrained`)."""
        return online.export_policy(self, path, tokenizer)
