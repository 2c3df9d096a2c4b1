"""Offline preference optimisation as a LightningModule: DPO (Rafailov et al. 2023) and its family (cDPO, robust
DPO, IPO, SLiC hinge, SimPO, ORPO, the RPO term), over LoRA adapters of ONE base (`lit_ft.online.roles`, as PPO).

The policy is a trainable copy of the SFT adapter and the reference is the frozen SFT adapter on the same base;
without an SFT adapter the policy is a new LoRA and the reference is the base itself (PEFT's `disable_adapter`).
Batches come from `PreferenceDataModule`: chosen and rejected sequences with completion-only labels, padded or packed,
in one forward. Losses are pure functions of per-sequence log-prob sums (`lit_ft.losses.preference_loss`).
Reference log-probs are computed on the fly (one no-grad pass under the reference adapter per batch) or, with
`dpo.precompute_ref`, once before training for the training and validation pairs (`lit_ft.stages.dpo_ref`); the table rides
in the checkpoint under the dataset's digest, so a resumed run does not recompute it. What DPO shares with KTO (the
roles, the precomputed table, the checkpoint hooks, the export) is in `lit_ft.stages.offline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft.train import checkpointing, guards, metrics, optim, runs, strategies

from lit_ft.stages import dpo_ref, offline

from lit_ft.online import roles
from lit_ft.errors import ConfigError
from lit_ft.train.guards import NonFiniteGuard
from lit_ft.losses import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, preference_loss
from lit_ft.models import LoraSpec, ModelSpec, eval_mode
from lit_ft.train.optim import OptimSpec

REF_KEY = "dpo_reference"  # checkpoint key of the precomputed reference tables


@dataclass
class DPOSpec:
    """Preference-optimisation settings; defaults follow the DPO paper (Rafailov et al. 2023) and TRL's DPOConfig."""

    loss_type: Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"] = "sigmoid"
    """`sigmoid`: DPO (with label_smoothing > 0: conservative DPO, Mitchell 2023); `robust`: robust DPO (Chowdhury et
    al. 2024); `ipo` (Azar et al. 2023, on length-averaged log-probs); `hinge`: SLiC (Zhao et al. 2023); `simpo`
    (Meng et al. 2024) and `orpo` (Hong et al. 2024) are reference-free (no reference pass)."""
    beta: float = 0.1
    """DPO's beta, the strength of the implicit KL constraint (0.1 in the paper); IPO's tau; the hinge's 1/delta;
    SimPO's reward scale (its paper uses 2.0-2.5); ORPO's lambda (0.1 in its paper)."""
    label_smoothing: float = 0.0
    """Assumed rate of flipped labels for cDPO / robust DPO (and SimPO's smoothing); 0 is plain DPO."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma (TRL's CPOConfig default; the paper tunes gamma/beta in 0.3-0.8)."""
    rpo_alpha: float | None = None
    """RPO (Pang et al. 2024): add this weight times the chosen response's mean token NLL (the paper uses 1.0);
    None adds nothing."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every training and validation pair once before training and keep them
    in the checkpoint (keyed by the dataset's digest) instead of a reference forward each step."""
    disable_dropout: bool = True
    """Dropout off in the base and the adapters (TRL's DPOConfig default): at the start the policy then equals the
    reference exactly (loss log 2), and precomputed and on-the-fly reference log-probs agree."""
    logp_chunk_size: int = 1024
    """Response positions per chunk of the LM head + log-softmax (bounds the logits in memory)."""
    ref_batch_size: int = 16
    """Pairs per batch of the precomputing pass."""

    def check(self) -> None:
        """Refuse settings that cannot work, naming the setting."""
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ConfigError(f"model.dpo.loss_type: expected one of {list(PREFERENCE_LOSSES)}, got {self.loss_type!r}")
        if not self.beta > 0:
            raise ConfigError(f"model.dpo.beta: must be > 0, got {self.beta}")
        top = 0.5 if self.loss_type == "robust" else 1.0
        if not 0.0 <= self.label_smoothing < top:
            raise ConfigError(f"model.dpo.label_smoothing: must be in [0, {top}) for loss_type "
                              f"{self.loss_type!r}, got {self.label_smoothing}")
        if self.rpo_alpha is not None and self.rpo_alpha < 0:
            raise ConfigError(f"model.dpo.rpo_alpha: must be >= 0 or null, got {self.rpo_alpha}")
        if self.logp_chunk_size < 1 or self.ref_batch_size < 1:
            raise ConfigError("model.dpo.logp_chunk_size and model.dpo.ref_batch_size must be >= 1")


_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected")


class DPOModule(L.LightningModule):
    """DPO and its family over a LoRA policy and a reference adapter on one base (see the module docstring)."""

    SECTION, REF_KEY = "dpo", REF_KEY  # `lit_ft.stages.offline`: the settings section, the table's checkpoint key
    DIGEST_COLUMNS, TABLE_KEY = dpo_ref.DIGEST_COLUMNS, "line"  # what the reference table is keyed by

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoraSpec | None = LoraSpec(),
        sft_adapter: str | None = None,
        dpo: DPOSpec = DPOSpec(),
        optim: optim.OptimSpec = optim.OptimSpec(lr=5e-5, scheduler="cosine", warmup_ratio=0.1),
        compile: bool | None = None,
        max_consecutive_skips: int = 10,
    ):
        """
        Args:
            base: the frozen base model (dtype, quantization, gradient checkpointing).
            lora: LoRA of a new policy when there is no SFT adapter.
            sft_adapter: SFT adapter directory: the policy starts from it and a frozen copy is the reference.
                None (and no base.adapter): a new LoRA policy, and the base without adapters is the reference.
            dpo: the loss and how the reference is computed.
            optim: optimizer and learning-rate schedule (5e-5: LoRA takes a higher rate than the DPO paper's
                full fine-tuning 5e-7..1e-6; 10% warmup as in its experiments).
            compile: `torch.compile` each decoder layer (inductor), as `SFTModule(compile=...)`; None (the
                default): `--memory auto` decides.
            max_consecutive_skips: optimizer steps with a NaN/inf loss or gradient are skipped and counted
                (`train/skipped_steps`); this many in a row stop the run with `NonFiniteError` (lit_ft.train.guards).
        """
        super().__init__()
        self.save_hyperparameters()
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        self.base, self.lora = checkpointing.as_spec(ModelSpec, base), checkpointing.as_spec(LoraSpec, lora)
        self.dpo, self.optim = checkpointing.as_spec(DPOSpec, dpo), checkpointing.as_spec(OptimSpec, optim)
        self.dpo.check()
        self.sft_adapter = sft_adapter or self.base.adapter
        if self.sft_adapter is None and self.lora is None:
            raise ConfigError("DPO needs a policy adapter: set model.sft_adapter or model.lora")
        self.compile_layers = compile  # not `self.compile`: that would hide nn.Module.compile
        self.guard = NonFiniteGuard(max_consecutive_skips)
        self.strict_loading = False  # checkpoints hold the policy adapter only
        self.model = self.roles = None
        self.reference_free = self.dpo.loss_type in REFERENCE_FREE_LOSSES
        self.ref_tables: dict[str, dpo_ref.ReferenceTable] = {}
        self.precomputed: list[str] = []  # splits whose table this process computed (not read from a checkpoint)
        self.val_stats = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in ("loss",) + _STATS})
        self.group_accuracy = metrics.GroupAccuracy()  # val/rewards/accuracies/<subset> (PreferenceDataModule)

    # -- model ----------------------------------------------------------------------------------------------

    configure_model = offline.configure_model  # policy and reference adapters on one base (idempotent)
    setup = offline.setup  # FSDP and DeepSpeed refused

    # -- log-probs ------------------------------------------------------------------------------------------

    def policy_logps(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(log-prob sums [2B], response tokens [2B]) under the policy, chosen then rejected, one forward."""
        with self.roles.active(roles.POLICY):
            return dpo_ref.sequence_logps(self.model, batch, self.dpo.logp_chunk_size)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(ref chosen [B], ref rejected [B]) computed now: the reference adapter (or the bare base), eval mode."""
        with eval_mode(self.model), self.roles.active(roles.REF):
            sums, _ = dpo_ref.sequence_logps(self.model, batch, self.dpo.logp_chunk_size)
        return sums.chunk(2)

    def batch_reference(self, batch: dict, split: str) -> tuple[Tensor | None, Tensor | None]:
        if self.reference_free:
            return None, None
        if split in self.ref_tables:
            return self.ref_tables[split].lookup(batch["line"])
        return self.reference_logps(batch)

    def pair_stats(self, batch: dict, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """(mean loss, per-pair stats [B] named as TRL logs them) of one preference batch."""
        ref_c, ref_r = self.batch_reference(batch, split)
        logps, tokens = self.policy_logps(batch)
        (lc, lr), (nc, nr) = logps.chunk(2), tokens.chunk(2)
        d = self.dpo
        losses, rc, rr = preference_loss(lc, lr, ref_c, ref_r, nc, nr, d.loss_type, d.beta, d.label_smoothing,
                                         d.simpo_gamma, d.rpo_alpha)
        stats = {"rewards/chosen": rc, "rewards/rejected": rr, "rewards/accuracies": (rc > rr).float(),
                 "rewards/margins": rc - rr, "logps/chosen": lc.detach(), "logps/rejected": lr.detach()}
        return losses.mean(), stats

    # -- precomputed reference (`offline.ensure_reference`: the table of every training and validation pair) --

    on_fit_start = offline.on_fit_start
    on_validation_start = offline.on_validation_start

    # -- steps ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # 1. Reference log-probs (precomputed table, or a no-grad pass under the reference adapter); 2. the policy's
        # over chosen and rejected in one forward; 3. the loss and the implicit rewards.
        loss, stats = self.pair_stats(batch, "train")
        pairs = batch["margin"].shape[0]
        # 4. Log, with the batch size Lightning cannot infer from a dict of tensors.
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        for k, v in stats.items():
            self.log(f"train/{k}", v.mean(), prog_bar=k == "rewards/accuracies", batch_size=pairs)
        # 5. Pair-weighted over the whole optimizer step (every micro-batch, every rank): guards.CountWeighting.
        return self.guard.weighting.loss(self, loss * pairs, torch.tensor(pairs, device=loss.device))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, stats = self.pair_stats(batch, "val")
        pairs = batch["margin"].shape[0]
        self.val_stats["loss"].update(loss, weight=pairs)
        for k, v in stats.items():
            self.val_stats[k.replace("/", "_")].update(v)
        self.group_accuracy.update(batch, stats["rewards/accuracies"])  # per-subset implicit-reward accuracy

    def on_validation_epoch_start(self) -> None:
        metrics.fresh(*self.val_stats.values())
        self.group_accuracy.start(self)

    def on_validation_epoch_end(self) -> None:
        if self.val_stats["loss"].update_count == 0:
            return
        for key, metric in self.val_stats.items():
            name = key.replace("_", "/")
            self.log(f"val/{name}", metric.compute(), prog_bar=name in ("loss", "rewards/accuracies"))
            metric.reset()
        self.group_accuracy.log(self, "val/rewards/accuracies")

    configure_optimizers = offline.configure_optimizers
    optimizer_step = guards.optimizer_step  # skip (and count) a step whose loss or gradients are not finite
    lr_scheduler_step = guards.lr_scheduler_step  # a skipped step does not advance the schedule

    # -- checkpoints and export -----------------------------------------------------------------------------

    configure_callbacks = runs.configure_callbacks  # exact resume, resume rules, run lock, preemption
    load_state_dict = checkpointing.load_trainable  # the frozen base is not 'missing' from a checkpoint
    configure_gradient_clipping = strategies.configure_gradient_clipping

    on_save_checkpoint = offline.on_save_checkpoint  # slim and sealed, with the reference tables
    on_load_checkpoint = offline.on_load_checkpoint
    save_adapter = offline.save_adapter  # the policy adapter in PEFT format
