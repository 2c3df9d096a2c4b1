"""Supervised fine-tuning of a causal LM with LoRA / QLoRA as a LightningModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from lit_ft.train import checkpointing, graphs, guards, metrics, runs, strategies

from lit_ft.stages import predict
from lit_ft.train import optim as optim_mod
from lit_ft.train.guards import GUARD_KEY, NonFiniteGuard
from lit_ft.models import families
from lit_ft.errors import ConfigError
from lit_ft.losses import causal_lm_loss
from lit_ft.models.neftune import add_neftune
from lit_ft.models import LoraSpec, ModelSpec, build_model, compile_decoder_layers, describe
from lit_ft.validation import check_init


class SFTModule(L.LightningModule):
    """Completion-only causal-LM loss over a PEFT model.

    Batches carry `input_ids`, `attention_mask` and `labels` (-100 where no loss is taken), and for padding-free
    packing `position_ids` that restart at each packed sequence. The loss is computed from the final hidden
    states in chunks, so the full [B, T, V] float32 logits never exist.
    """

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoraSpec | None = LoraSpec(),
        optim: optim_mod.OptimSpec = optim_mod.OptimSpec(),
        loss_chunk_size: int = 4096,
        compile: bool | None = None,
        max_consecutive_skips: int = 10,
        neftune_alpha: float | None = None,
        cuda_graphs: bool | None = None,
    ):
        """
        Args:
            base: the base model and how it is held (dtype, quantization, checkpointing).
            lora: the adapter to train (ignored when base.adapter names an existing one).
            optim: optimizer and learning-rate schedule.
            loss_chunk_size: tokens per chunk of the cross-entropy (bounds the float32 logits in memory).
            compile: `torch.compile` each decoder layer (inductor). Same function, fused element-wise kernels and
                fewer saved activations; the first steps pay the compilation (about half a minute on a GPU). None (the
                default): `--memory auto` (the default of `lit-ft fit`) decides: on a GPU and an unquantized base, on
                when the run is long enough for the faster steps to pay for compiling (`lit_ft.plan.auto`), else off;
                true/false fix it.
            max_consecutive_skips: optimizer steps with a NaN/inf loss or gradient are skipped and counted
                (`train/skipped_steps`); this many in a row stop the run with `NonFiniteError` (lit_ft.train.guards).
            neftune_alpha: NEFTune (Jain et al. 2023): uniform noise of scale alpha / sqrt(L * d) on the input
                embeddings while training (the paper uses 5, 10 or 15); None = off. Validation and generation
                see no noise.
            cuda_graphs: replay each training step's forward and backward from a CUDA graph (`lit_ft.train.graphs`):
                the host no longer queues the step's kernels one by one, which is most of a small model's step.
                Batches are padded to a multiple of 64 tokens (one graph a length, captured when first seen),
                every position goes through the head (an ignored one adds zero), and the padding mask is left out,
                which is exact for right-padded rows (checked on the first batches). One CUDA device, one process,
                unpacked batches, no loss scaler (`16-mixed`); not with `compile`, NEFTune, activation offloading or a
                mixture-of-experts model. None (the default): `--memory auto` decides; off without a plan.
        """
        check_init("model (SFTModule)", SFTModule, locals())
        super().__init__()
        self.save_hyperparameters()
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        self.base = checkpointing.as_spec(ModelSpec, base)
        self.lora = checkpointing.as_spec(LoraSpec, lora)
        self.optim = checkpointing.as_spec(optim_mod.OptimSpec, optim)
        self.loss_chunk_size = loss_chunk_size
        self.compile_layers = compile  # not `self.compile`: that would hide nn.Module.compile
        self.neftune_alpha = neftune_alpha
        if compile and cuda_graphs:
            raise ConfigError("model.cuda_graphs and model.compile: choose one (compiled layers inside a captured "
                              "step are not supported)")
        self.cuda_graphs = cuda_graphs
        self._graphs: graphs.CapturedGradients | None = None
        self._graph_checks = 0
        self._grads_done = False
        self.model = None
        self.strict_loading = False  # checkpoints hold the adapter only
        self.val_loss = MeanMetric()
        self.guard = NonFiniteGuard(max_consecutive_skips)

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = strategies.model_device(self, self.base)
        self.model = build_model(self.base, self.lora, "causal_lm", device=device)
        if hasattr(self._decoder_and_head()[1], "lora_A"):
            raise ConfigError(
                "model.lora.target_modules: the LM head is adapted, but SFT computes its loss from the head's weight "
                "in chunks (model.loss_chunk_size), which a LoRA on the head would bypass: it would never train. "
                "Leave the head out of target_modules (the default 'all' does)")
        if self.neftune_alpha:
            add_neftune(self.model, self.neftune_alpha)
        if self.compile_layers:
            compile_decoder_layers(self.model, eager_on_error=getattr(self, "compile_planned", False))
        if self.cuda_graphs and (why := self._uncapturable()):
            if not getattr(self, "graphs_planned", False):
                raise ConfigError(f"model.cuda_graphs: {why}; turn it off")
            rank_zero_info(f"model.cuda_graphs: off ({why})")  # (the plan cannot see this; eager it is)
            self.cuda_graphs = False
        rank_zero_info(describe(self.model))

    def _uncapturable(self) -> str | None:
        """Why this model's training step cannot be captured as `cuda_graphs` needs, or None."""
        if self.neftune_alpha:
            return "NEFTune's noise scale reads the padded length, which the 64-token buckets would change"
        if self.base.activation_offloading:
            return "activation offloading waits for its copies inside the backward"
        if families.routes_experts(self.model.get_base_model().config):
            return "a mixture-of-experts model routes each token by its values (shapes that depend on the data)"
        return None

    @property
    def lr(self) -> float:
        """`optim.lr`, under the name `Tuner.lr_find` reads and sets."""
        return self.optim.lr

    @lr.setter
    def lr(self, value: float) -> None:
        import dataclasses

        self.optim = dataclasses.replace(self.optim, lr=float(value))

    def _decoder_and_head(self):
        inner = self.model.get_base_model()
        return inner.get_decoder(), inner.get_output_embeddings()

    def token_loss(self, batch: dict, captured: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, number of loss tokens) for one batch. `captured`: the step a CUDA graph records
        (right-padded rows: no padding mask, which a causal model's real tokens never need; every position through
        the head: no shape that depends on the labels)."""
        decoder, head = self._decoder_and_head()
        packed = "position_ids" in batch
        if packed:
            families.check_packing(self.model)  # once: does this attention derive masks from position_ids?
        hidden = decoder(
            input_ids=batch["input_ids"],
            # Packed rows: no padding mask; transformers derives the block-diagonal causal mask from the
            # restarting position_ids, so no token attends across a sequence boundary.
            attention_mask=None if packed or captured else batch["attention_mask"],
            position_ids=batch.get("position_ids"),
            use_cache=False,
        ).last_hidden_state
        # The model's own logits: its head bias and whatever it applies after the head (families.logit_transform).
        return causal_lm_loss(hidden, head.weight, batch["labels"], chunk_size=self.loss_chunk_size,
                              head_bias=head.bias, transform=families.logit_transform(self.model), gather=not captured)

    # -- the captured step (cuda_graphs) --------------------------------------------------------------------

    def _captured_token_loss(self, batch: dict, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_loss` of a training batch with its forward and backward replayed from a CUDA graph: the gradients
        are accumulated here, onto zeros at the first micro-batch of an optimizer step (Lightning's `zero_grad` and
        `backward`, which come after `training_step`, then have nothing to do), and the outputs carry no graph."""
        if self._graphs is None:
            self._graphs = graphs.CapturedGradients(self.model.parameters())
            graphs.check_capturable(self, "model.cuda_graphs")
        batch = graphs.pad_to_bucket({k: batch[k] for k in ("input_ids", "attention_mask", "labels")},
                                     {"input_ids": 0, "attention_mask": 0, "labels": -100})
        count = (batch["labels"][:, 1:] != -100).sum()
        unit = self.guard.weighting.add(self, count)  # the count-weighted loss of the step (guards.CountWeighting)
        batch["scale"] = 1.0 / (unit * self.trainer.accumulate_grad_batches)  # (a graph input: set each replay)
        fresh = batch_idx % self.trainer.accumulate_grad_batches == 0  # Lightning's rule for zeroing
        loss_sum, n_tokens = self._graphs.run(self._captured_objective, batch, fresh=fresh)
        self._grads_done = True
        return loss_sum, n_tokens

    def _capturable(self, batch: dict) -> bool:
        """Whether this batch can take the captured step: not packed, right-padded (checked on the first batches).
        One that cannot stops a run that asked for `cuda_graphs`; one the plan chose it for goes on eagerly."""
        why = None
        if "position_ids" in batch:
            why = "packed batches (data.packing) cannot be captured: their attention depends on where each sequence starts"
        elif self._graph_checks < 4:  # the captured step leaves the padding mask out: exact for right padding only
            self._graph_checks += 1
            if not graphs.right_padded(batch["attention_mask"]):
                why = ("a batch's padding is not at the end of its rows (left padding?): the captured step leaves the "
                       "padding mask out, which is exact for right padding only")
        if why is None:
            return True
        if not getattr(self, "graphs_planned", False):
            raise ConfigError(f"model.cuda_graphs: {why}; turn it off")
        rank_zero_info(f"model.cuda_graphs: off ({why})")
        self.cuda_graphs = False
        return False

    def _captured_objective(self, batch: dict) -> tuple[torch.Tensor, ...]:
        loss_sum, n_tokens = self.token_loss(batch, captured=True)
        # What Lightning would call backward on: the count-weighted sum over its accumulation steps.
        return loss_sum * batch["scale"], loss_sum, n_tokens

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if not self._grads_done:  # (the captured step started from zeros already)
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if self._grads_done:  # the captured step accumulated the gradients already
            self._grads_done = False
            return
        super().backward(loss, *args, **kwargs)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_graphs"] = None  # CUDA graphs belong to this process's device (a copy captures its own)
        return state

    # -- steps ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.cuda_graphs and self._capturable(batch):
            loss_sum, n_tokens = self._captured_token_loss(batch, batch_idx)
            loss = loss_sum / self.guard.weighting.unit  # (counted in already; carries no graph)
        else:
            loss_sum, n_tokens = self.token_loss(batch)
            # 1. Token-weighted over the whole optimizer step (every micro-batch of the accumulation, every rank):
            #    the sum over this micro-batch's tokens, rescaled before the step (guards.CountWeighting).
            loss = self.guard.weighting.loss(self, loss_sum, n_tokens)
        # 2. Log this micro-batch's mean per token, with the batch size Lightning cannot infer from a dict.
        bsz = batch["input_ids"].shape[0]
        self.log("train/loss", loss_sum.detach() / n_tokens.clamp(min=1), prog_bar=True, batch_size=bsz)
        self.log("train/loss_tokens", n_tokens.float(), batch_size=bsz, reduce_fx="sum")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss_sum, n_tokens = self.token_loss(batch)
        if n_tokens > 0:
            # Token-weighted: val/loss is the mean over all validation tokens, not over batches.
            self.val_loss.update(loss_sum / n_tokens, weight=n_tokens)

    def on_validation_epoch_start(self) -> None:
        metrics.fresh(self.val_loss)
        if self._graphs is not None:  # validation cannot use the graphs' pool: its memory back, recaptured after
            self._graphs.release()

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        loss = self.val_loss.compute()
        self.val_loss.reset()
        split = metrics.split_name(self)  # "test" under `test`, where the same steps score data.test_file
        self.log(f"{split}/loss", loss, prog_bar=True, sync_dist=False)
        self.log(f"{split}/ppl", torch.exp(loss.clamp(max=50)))

    # `test` scores data.test_file as validation scores the val file; `predict` generates (lit_ft.stages.predict).
    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end
    predict_step = predict.predict_step

    def configure_optimizers(self):
        return optim_mod.configure(self, self.optim, self.trainer.estimated_stepping_batches)

    optimizer_step = guards.optimizer_step  # skip (and count) a step whose loss or gradients are not finite
    lr_scheduler_step = guards.lr_scheduler_step  # a skipped step does not advance the schedule

    # -- checkpoints and export -----------------------------------------------------------------------------

    configure_callbacks = runs.configure_callbacks  # exact resume, resume rules, run lock, preemption
    load_state_dict = checkpointing.load_trainable  # the frozen base is not 'missing' from a checkpoint
    configure_gradient_clipping = strategies.configure_gradient_clipping  # norm clipping under FSDP too

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.slim(self, checkpoint, self.base.identity(), extra={GUARD_KEY: self.guard.state_dict()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.check_resume(self, checkpoint, self.base.identity())
        guards.restore(self, checkpoint)

    def save_adapter(self, path: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Write the adapter in PEFT format (what `PeftModel.from_pretrained` loads); `state_dict` under FSDP."""
        return checkpointing.save_adapter(self.model, path, tokenizer, self.base.identity(), state_dict)
