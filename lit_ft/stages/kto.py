"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") as a LightningModule:
offline alignment from UNPAIRED examples, each a completion labelled desirable or undesirable, over LoRA adapters
of ONE base, as DPO (`lit_ft.stages.offline`: the roles, the precomputed reference, the checkpoint hooks, the export).

Each example's implicit reward is ``beta * (log pi(y|x) - log pi_ref(y|x))``; the loss pulls desirable ones above and
undesirable ones below a reference point z0, the policy's KL from the reference, estimated on the micro-batch's
MISMATCHED pairs (each prompt followed by another example's completion, `lit_ft.data.collate.UnpairedCollator`) and
averaged over the ranks (`lit_ft.losses.kto_loss`). Batches come from `UnpairedPreferenceDataModule`: TRL's unpaired
rows, or preference pairs read as one desirable and one undesirable example each.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torchmetrics import MeanMetric

from lit_ft.errors import ConfigError
from lit_ft.losses import kto_kl, kto_loss
from lit_ft.models import LoraSpec, ModelSpec, eval_mode
from lit_ft.online import roles
from lit_ft.stages import dpo_ref, offline
from lit_ft.train import checkpointing, guards, metrics, optim, runs, strategies
from lit_ft.train.guards import NonFiniteGuard
from lit_ft.train.optim import OptimSpec
from lit_ft.validation import check_init, check_spec


@dataclass
class KTOSpec:
    """KTO's settings; defaults follow the paper and TRL's KTOConfig."""

    beta: float = 0.1
    """The strength of the implicit KL constraint, as DPO's beta (0.1 in the paper and TRL)."""
    desirable_weight: float = 1.0
    """lambda_D, the weight of a desirable example's loss. With unbalanced data the paper (and TRL) recommend
    desirable_weight x n_desirable / (undesirable_weight x n_undesirable) in [1, 4/3]: the run warns outside it,
    naming weights that fit."""
    undesirable_weight: float = 1.0
    """lambda_U, the weight of an undesirable example's loss."""
    precompute_ref: bool = False
    """Compute the reference log-probs of every training and validation completion once before training and keep
    them in the checkpoint (keyed by the dataset's digest). The mismatched pairs change with every shuffled batch,
    so their reference pass still runs each step."""
    disable_dropout: bool = True
    """Dropout off in the base and the adapters (TRL's default): at the start the policy equals the reference, every
    implicit reward and the KL estimate are 0 and each loss is its weight / 2."""
    logp_chunk_size: int = 1024
    """Response positions per chunk of the LM head + log-softmax (bounds the logits in memory)."""
    ref_batch_size: int = 16
    """Examples per batch of the precomputing pass."""

    def __post_init__(self):
        check_spec(self, "model.kto")


def pair_accuracy(lines: Tensor, desirable: Tensor, rewards: Tensor) -> Tensor:
    """(reward of the desirable example > reward of the undesirable one) of every pair whose two examples (one
    source line, as a pair of preference data becomes) are both in this batch; empty for unpaired data."""
    good = {int(n): float(r) for n, d, r in zip(lines.tolist(), desirable.tolist(), rewards.tolist()) if d}
    won = [float(good[int(n)] > float(r)) for n, d, r in zip(lines.tolist(), desirable.tolist(), rewards.tolist())
           if not d and int(n) in good]
    return torch.tensor(won, dtype=torch.float32)


_STATS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected")


class KTOModule(L.LightningModule):
    """KTO over a LoRA policy and a reference adapter on one base (see the module docstring)."""

    SECTION, REF_KEY = "kto", "kto_reference"  # `lit_ft.stages.offline`: the settings, the tables' checkpoint key
    DIGEST_COLUMNS, TABLE_KEY = ("input_ids", "prompt_length", "label", "line"), "example"  # the table's keys

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoraSpec | None = LoraSpec(),
        sft_adapter: str | None = None,
        kto: KTOSpec = KTOSpec(),
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
            kto: beta, the desirable and undesirable weights, and how the reference is computed.
            optim: optimizer and learning-rate schedule (as DPO's: LoRA takes a higher rate than the paper's full
                fine-tuning).
            compile: `torch.compile` each decoder layer (inductor), as `SFTModule(compile=...)`; None (the
                default): `--memory auto` decides.
            max_consecutive_skips: optimizer steps with a NaN/inf loss or gradient are skipped and counted
                (`train/skipped_steps`); this many in a row stop the run with `NonFiniteError` (lit_ft.train.guards).
        """
        check_init("model (KTOModule)", KTOModule, locals())
        super().__init__()
        self.save_hyperparameters()
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        self.base, self.lora = checkpointing.as_spec(ModelSpec, base), checkpointing.as_spec(LoraSpec, lora)
        self.kto, self.optim = checkpointing.as_spec(KTOSpec, kto), checkpointing.as_spec(OptimSpec, optim)
        self.sft_adapter = sft_adapter or self.base.adapter
        if self.sft_adapter is None and self.lora is None:
            raise ConfigError("KTO needs a policy adapter: set model.sft_adapter or model.lora")
        self.compile_layers = compile  # not `self.compile`: that would hide nn.Module.compile
        self.guard = NonFiniteGuard(max_consecutive_skips)
        self.strict_loading = False  # checkpoints hold the policy adapter only
        self.model = self.roles = None
        self.ref_tables: dict[str, dpo_ref.ReferenceTable] = {}
        self.precomputed: list[str] = []  # splits whose table this process computed (not read from a checkpoint)
        self.val_stats = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in _STATS})

    configure_model = offline.configure_model  # policy and reference adapters on one base (idempotent)

    def setup(self, stage: str) -> None:
        offline.setup(self, stage)  # FSDP and DeepSpeed refused
        size = getattr(self.trainer.datamodule, "batch_size", None)
        if isinstance(size, int) and size < 2:  # set after the DataModule checked it (`lit-ft fit --memory auto`)
            raise ConfigError(f"data.batch_size={size}: KTO needs at least 2 examples a micro-batch (its KL estimate "
                              "pairs each prompt with another example's completion); use gradient checkpointing or "
                              "trainer.accumulate_grad_batches with a micro-batch of 2 or more")

    # -- log-probs ------------------------------------------------------------------------------------------

    def policy_logps(self, batch: dict) -> Tensor:
        """Log-prob sums [B] of each example's completion under the policy (one forward, with grad)."""
        with self.roles.active(roles.POLICY):
            return dpo_ref.sequence_logps(self.model, batch, self.kto.logp_chunk_size)[0]

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> tuple[Tensor]:
        """(ref log-prob sums [B],) of the completions, computed now: the reference adapter (or the bare base)."""
        with eval_mode(self.model), self.roles.active(roles.REF):
            return (dpo_ref.sequence_logps(self.model, batch, self.kto.logp_chunk_size)[0],)

    def batch_reference(self, batch: dict, split: str) -> Tensor:
        if split in self.ref_tables:
            return self.ref_tables[split].lookup(batch[self.TABLE_KEY], "model.kto.precompute_ref")[0]
        return self.reference_logps(batch)[0]

    @torch.no_grad()
    def kl_estimate(self, batch: dict) -> Tensor:
        """KTO's KL estimate: the mean log-ratio of the mismatched pairs of this micro-batch on every rank (no grad:
        z0 is a constant of the loss); 0 when no rank has any (micro-batches of one example)."""
        local = torch.zeros(2, device=self.device)
        if "kl_input_ids" in batch:
            pairs = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
                     "labels": batch["kl_labels"]}
            with self.roles.active(roles.POLICY):
                policy, _ = dpo_ref.sequence_logps(self.model, pairs, self.kto.logp_chunk_size)
            with eval_mode(self.model), self.roles.active(roles.REF):
                ref, _ = dpo_ref.sequence_logps(self.model, pairs, self.kto.logp_chunk_size)
            n = float(policy.shape[0])
            local = torch.stack([kto_kl(policy, ref) * n, torch.tensor(n, device=policy.device)]).to(local)
        trainer = self._trainer
        total = trainer.strategy.reduce(local, reduce_op="sum") if trainer is not None else local
        return total[0] / total[1].clamp(min=1)

    def example_stats(self, batch: dict, split: str) -> tuple[Tensor, dict[str, Tensor]]:
        """(per-example losses [B], stats named as TRL logs them) of one batch."""
        # 1. Reference log-probs of the completions (precomputed table, or a no-grad pass); 2. the KL estimate from
        # the mismatched pairs (no grad, every rank); 3. the policy's log-probs of the completions (with grad).
        ref = self.batch_reference(batch, split)
        kl = self.kl_estimate(batch)
        logps = self.policy_logps(batch)
        k, desirable = self.kto, batch["label"]
        losses, rewards, z0 = kto_loss(logps, ref, desirable, kl, k.beta, k.desirable_weight, k.undesirable_weight)
        stats = {"kl": z0, "rewards/chosen": rewards[desirable], "rewards/rejected": rewards[~desirable],
                 "logps/chosen": logps.detach()[desirable], "logps/rejected": logps.detach()[~desirable]}
        if split == "val" and "line" in batch:  # preference pairs read as two examples: their implicit-reward order
            stats["rewards/accuracies"] = pair_accuracy(batch["line"], desirable, rewards).to(rewards.device)
        return losses, stats

    # -- steps ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        losses, stats = self.example_stats(batch, "train")
        n = losses.shape[0]
        # 4. Log (a class absent from the batch logs nothing), with the batch size Lightning cannot infer.
        self.log("train/loss", losses.mean(), prog_bar=True, batch_size=n)
        self.log("train/kl", stats["kl"], batch_size=n)
        for key, v in stats.items():
            if key != "kl" and v.numel():
                self.log(f"train/{key}", v.mean(), batch_size=v.numel())
        if stats["rewards/chosen"].numel() and stats["rewards/rejected"].numel():
            self.log("train/rewards/margins", stats["rewards/chosen"].mean() - stats["rewards/rejected"].mean(),
                     batch_size=n)
        # 5. Example-weighted over the whole optimizer step (every micro-batch, every rank): guards.CountWeighting.
        return self.guard.weighting.loss(self, losses.sum(), torch.tensor(n, device=losses.device))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        losses, stats = self.example_stats(batch, "val")
        self.val_stats["loss"].update(losses)
        self.val_stats["kl"].update(stats["kl"], weight=losses.shape[0])
        for key, v in stats.items():
            if key != "kl" and v.numel():
                self.val_stats[key.replace("/", "_")].update(v)

    def on_validation_epoch_start(self) -> None:
        metrics.fresh(*self.val_stats.values())

    def on_validation_epoch_end(self) -> None:
        done = {key.replace("_", "/"): m.compute() for key, m in self.val_stats.items() if m.update_count}
        for m in self.val_stats.values():
            m.reset()
        if "rewards/chosen" in done and "rewards/rejected" in done:
            done["rewards/margins"] = done["rewards/chosen"] - done["rewards/rejected"]
        for name, value in done.items():
            self.log(f"val/{name}", value, prog_bar=name in ("loss", "rewards/margins"))

    # -- the class balance and the precomputed reference ------------------------------------------------------

    def on_fit_start(self) -> None:
        offline.on_fit_start(self)  # the reference tables, when precomputed
        dataset = getattr(self.trainer.datamodule, "train_dataset", None)
        if dataset is not None and "label" in dataset.column_names:
            labels = dataset["label"]
            balance_advice(sum(labels), len(labels) - sum(labels), self.kto)

    on_validation_start = offline.on_validation_start
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


def balance_advice(desirable: int, undesirable: int, spec: KTOSpec) -> str | None:
    """Log the class counts and, where desirable_weight x n_D / (undesirable_weight x n_U) is outside the [1, 4/3]
    the KTO paper recommends (TRL warns the same), warn with the weights that would bring it inside. Returns the
    warning (None: none)."""
    wd, wu = spec.desirable_weight, spec.undesirable_weight
    rank_zero_info(f"KTO: {desirable} desirable and {undesirable} undesirable training examples")
    if not desirable or not undesirable:
        return None  # the DataModule says that a class is missing
    ratio = wd * desirable / (wu * undesirable)
    if 1.0 <= ratio <= 4 / 3 + 1e-9:
        return None
    d_lo, d_hi = wu * undesirable / desirable, 4 / 3 * wu * undesirable / desirable
    u_lo, u_hi = 0.75 * wd * desirable / undesirable, wd * desirable / undesirable
    message = (f"model.kto: desirable_weight x n_desirable / (undesirable_weight x n_undesirable) = {wd:g} x "
               f"{desirable} / ({wu:g} x {undesirable}) = {ratio:.3f}, outside the [1, 4/3] the KTO paper recommends; "
               f"set model.kto.desirable_weight in [{d_lo:.3f}, {d_hi:.3f}] or model.kto.undesirable_weight in "
               f"[{u_lo:.3f}, {u_hi:.3f}] (one of the two)")
    rank_zero_warn(message)
    return message
