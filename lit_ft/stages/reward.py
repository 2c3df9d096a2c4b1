"""Bradley-Terry reward modelling with LoRA / QLoRA as a LightningModule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric

from lit_ft.train import checkpointing, guards, metrics, optim, runs, strategies

from lit_ft.models import adapters, shared_prompt
from lit_ft.online import scoring
from lit_ft.errors import ConfigError
from lit_ft.train.guards import GUARD_KEY, NonFiniteGuard
from lit_ft.losses import bradley_terry_loss
from lit_ft.train.optim import OptimSpec
from lit_ft.models import LoraSpec, ModelSpec, build_model, compile_decoder_layers, describe
from lit_ft.validation import check_init

STATS_KEY = "reward_stats"


class RewardModule(L.LightningModule):
    """A scalar reward model trained on preference pairs (Ouyang et al. 2022, sec. 3.5).

    Batches carry `input_ids` and `attention_mask` of shape [2B, T], right-padded, rows 0..B-1 the chosen
    responses and rows B..2B-1 the rejected ones, and `margin` [B] (0 where the data has none). Chosen and
    rejected go through ONE forward pass; the reward of a row is the score head applied to the hidden state of
    its last real token (found from the attention mask, since pad == EOS for many tokenizers). With
    `data.packing` the 2B sequences arrive packed padding-free (`PackedPreferenceCollator`): the same scores from
    the real tokens only, read at each sequence's last token (`scoring.packed_sequence_scores`); with
    `data.share_prompt` each pair is one row, its prompt once (`SharedPromptCollator`), the scores read at each
    response's last token (`scoring.shared_prompt_scores`).
    """

    def __init__(
        self,
        base: ModelSpec = ModelSpec(),
        lora: LoraSpec | None = LoraSpec(),
        optim: optim.OptimSpec = optim.OptimSpec(),
        center_coef: float = 0.0,
        use_margin: bool = True,
        normalize_on_fit_end: bool = True,
        max_consecutive_skips: int = 10,
        compile: bool | None = None,
    ):
        """
        Args:
            base: the base model and how it is held (dtype, quantization, checkpointing).
            lora: the adapter to train (ignored when base.adapter names an existing one). A new LoRA with
                task SEQ_CLS also makes the 1-output `score` head trainable and saves it with the adapter.
            optim: optimizer and learning-rate schedule.
            center_coef: weight of the reward-centering penalty mean((r_chosen + r_rejected)^2)
                (Eisenstein et al. 2023; 1e-2 is a common value); 0 disables it.
            use_margin: subtract the batch's `margin` inside the sigmoid (Llama 2, Touvron et al. 2023).
            normalize_on_fit_end: export `reward_normalization.json` with the gain and bias that give the rewards
                of the last validation epoch's chosen and rejected responses mean 0 and std 1.
            max_consecutive_skips: optimizer steps with a NaN/inf loss or gradient are skipped and counted
                (`train/skipped_steps`); this many in a row stop the run with `NonFiniteError` (lit_ft.train.guards).
            compile: `torch.compile` each decoder layer (inductor), as `SFTModule(compile=...)`: the same function
                with fused element-wise kernels (1.44x pairs/s on the W4 benchmark, BENCHMARKS.md); None (the
                default): `--memory auto` decides.
        """
        check_init("model (RewardModule)", RewardModule, locals())
        super().__init__()
        self.save_hyperparameters()
        checkpointing.yaml_safe_hparams(self)  # hparams.yaml loads with yaml.safe_load
        self.base = checkpointing.as_spec(ModelSpec, base)
        self.lora = checkpointing.as_spec(LoraSpec, lora)
        self.optim = checkpointing.as_spec(OptimSpec, optim)
        self.center_coef, self.use_margin, self.normalize_on_fit_end = center_coef, use_margin, normalize_on_fit_end
        self.guard = NonFiniteGuard(max_consecutive_skips)
        self.compile_layers = compile  # not `self.compile`: that would hide nn.Module.compile
        self.model = None
        self.strict_loading = False  # checkpoints hold the adapter and head only
        self.train_accuracy = MeanMetric()
        self.val_loss, self.val_accuracy, self.val_margin = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_reward, self.val_reward_sq = MeanMetric(), MeanMetric()
        # (mean, std) of the validation rewards, NaN until a validation epoch ran. A buffer rides in the
        # checkpoint's state_dict, so ExportAdapter(best=True) restores the stats of the best weights with them.
        self.group_accuracy = metrics.GroupAccuracy()  # val/accuracy/<subset> with PreferenceDataModule(group_field)
        self.register_buffer(STATS_KEY, torch.full((2,), float("nan"), dtype=torch.float64))

    # -- model ----------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = strategies.model_device(self, self.base)
        self.model = build_model(self.base, self.lora, "score", device=device)
        if self.compile_layers:
            compile_decoder_layers(self.model, eager_on_error=getattr(self, "compile_planned", False))
        rank_zero_info(describe(self.model))

    BATCH_FORMAT = ("a dict with input_ids Long[2B, T] (the B chosen rows, then the B rejected rows, right-padded), "
                    "attention_mask [2B, T] and optionally margin Float[B], as lit_ft.PreferenceDataModule collates "
                    "it (TRL's input_ids_chosen / input_ids_rejected pairs: concatenate them, chosen first); or "
                    "packed (data.packing): input_ids, position_ids and sequence_ids Long[R, L] and margin Float[B]; or each pair one "
                    "row (data.share_prompt, lit_ft.data.collate.SharedPromptCollator)")

    def rewards(self, batch: dict) -> torch.Tensor:
        """Raw fp32 rewards [2B] of every row of the batch (chosen rows first), one forward pass."""
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        if shared_prompt.is_shared(batch):  # each pair one row, its prompt once (data.share_prompt)
            return scoring.shared_prompt_scores(self.model, batch)
        packed = isinstance(batch, dict) and "position_ids" in batch  # padding-free: scores read at sequence ends
        if packed and not {"input_ids", "sequence_ids", "margin"} <= set(batch):
            raise ConfigError(f"RewardModule: a packed batch needs input_ids, position_ids, sequence_ids and margin "
                              f"(as lit_ft.PreferenceDataModule packs it); got {keys}")
        if not packed and not (isinstance(batch, dict) and {"input_ids", "attention_mask"} <= set(batch)):
            raise ConfigError(f"RewardModule: a batch is {self.BATCH_FORMAT}; got {keys}")
        if packed:
            return scoring.packed_sequence_scores(self.model, batch["input_ids"], batch["position_ids"],
                                                  batch["sequence_ids"], 2 * batch["margin"].shape[0])
        if batch["input_ids"].shape[0] % 2:
            raise ConfigError(f"RewardModule: {batch['input_ids'].shape[0]} rows, not 2B; a batch is "
                              f"{self.BATCH_FORMAT}")
        return scoring.sequence_scores(self.model, batch["input_ids"], batch["attention_mask"])

    def pair_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, r_chosen [B], r_rejected [B]) of one preference batch."""
        r_chosen, r_rejected = self.rewards(batch).chunk(2)
        margin = batch.get("margin") if self.use_margin else None
        return bradley_terry_loss(r_chosen, r_rejected, margin, self.center_coef), r_chosen, r_rejected

    # -- steps ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # 1. One forward over the 2B rows; split into chosen and rejected rewards; Bradley-Terry loss.
        loss, r_chosen, r_rejected = self.pair_loss(batch)
        # 2. Pairwise accuracy of this batch (a share of pairs, so it is weighted by the number of pairs).
        pairs = r_chosen.shape[0]
        self.train_accuracy((r_chosen > r_rejected).float().detach())  # forward: this batch's value for on_step
        # 3. Log with the batch size Lightning cannot infer from a dict of tensors.
        self.log("train/loss", loss, prog_bar=True, batch_size=pairs)
        self.log("train/accuracy", self.train_accuracy, prog_bar=True, batch_size=pairs)
        # 4. Pair-weighted over the whole optimizer step (every micro-batch, every rank): guards.CountWeighting.
        return self.guard.weighting.loss(self, loss * pairs, torch.tensor(pairs, device=loss.device))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, r_chosen, r_rejected = self.pair_loss(batch)
        pairs = r_chosen.shape[0]
        rewards = torch.cat([r_chosen, r_rejected])
        self.val_loss.update(loss, weight=pairs)
        self.val_accuracy.update((r_chosen > r_rejected).float())
        self.val_margin.update(r_chosen - r_rejected)
        self.val_reward.update(rewards)
        self.val_reward_sq.update(rewards.double() ** 2)
        self.group_accuracy.update(batch, r_chosen > r_rejected)

    def on_validation_epoch_start(self) -> None:
        metrics.fresh(self.val_loss, self.val_accuracy, self.val_margin, self.val_reward, self.val_reward_sq)
        self.group_accuracy.start(self)

    def on_validation_epoch_end(self) -> None:
        if self.val_loss.update_count == 0:
            return
        mean = self.val_reward.compute().double()
        std = (self.val_reward_sq.compute().double() - mean**2).clamp(min=0).sqrt()
        split = metrics.split_name(self)  # "test" under `test`, where the same steps score data.test_file
        self.log(f"{split}/loss", self.val_loss.compute(), prog_bar=True)
        self.log(f"{split}/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log(f"{split}/margin", self.val_margin.compute())
        self.log(f"{split}/reward_mean", mean.float())
        self.log(f"{split}/reward_std", std.float())
        self.group_accuracy.log(self, f"{split}/accuracy")
        if not (self.trainer.sanity_checking or getattr(self.trainer, "testing", False)):  # val data only
            self.reward_stats.copy_(torch.stack([mean, std]))
        for metric in (self.val_loss, self.val_accuracy, self.val_margin, self.val_reward, self.val_reward_sq):
            metric.reset()

    # `test` scores data.test_file as validation scores the val file.
    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start
    on_test_epoch_end = on_validation_epoch_end

    def configure_optimizers(self):
        return optim.configure(self, self.optim, self.trainer.estimated_stepping_batches)

    optimizer_step = guards.optimizer_step  # skip (and count) a step whose loss or gradients are not finite
    lr_scheduler_step = guards.lr_scheduler_step  # a skipped step does not advance the schedule

    # -- checkpoints and export -----------------------------------------------------------------------------

    configure_callbacks = runs.configure_callbacks  # exact resume, resume rules, run lock, preemption
    load_state_dict = checkpointing.load_trainable  # the frozen base is not 'missing' from a checkpoint
    configure_gradient_clipping = strategies.configure_gradient_clipping  # norm clipping under FSDP too

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.slim(self, checkpoint, self.base.identity(), extra={GUARD_KEY: self.guard.state_dict()},
                           extra_state={STATS_KEY: self.reward_stats.detach().clone()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpointing.check_resume(self, checkpoint, self.base.identity())
        guards.restore(self, checkpoint)

    def normalization(self) -> tuple[float, float] | None:
        """(gain, bias) that standardise the last validation epoch's rewards, or None when there are none."""
        mean, std = (float(x) for x in self.reward_stats)
        if mean != mean or std != std:  # NaN: no validation epoch ran
            return None
        return adapters.normalization_from_stats(mean, std)

    def save_adapter(self, path: str | Path, tokenizer=None, state_dict: dict | None = None) -> Path:
        """Write the reward model in the export format of `lit_ft.online.scoring` (what `RewardScorer` and PPO load).

        PEFT format (LoRA weights and the `score` head in `adapter_model.safetensors`), tokenizer files, the base
        identity (`lit_ft_base.json`) and with `normalize_on_fit_end` the `reward_normalization.json` of the last validation epoch.
        """
        path = checkpointing.save_adapter(self.model, path, tokenizer, self.base.identity(), state_dict)
        if not adapters.head_keys(path):
            # A reward adapter without its head reloads with a freshly initialised one: random rewards.
            raise RuntimeError(f"{path}/{adapters.ADAPTER_WEIGHTS} lacks the score head; add 'score' to "
                               "model.lora.modules_to_save")
        norm_file = path / adapters.NORMALIZATION_FILE
        norm = self.normalization() if self.normalize_on_fit_end else None
        if norm is not None:
            adapters.write_normalization(path, *norm)
        else:
            norm_file.unlink(missing_ok=True)  # never leave a stale file from an earlier export
            if self.normalize_on_fit_end:
                rank_zero_warn("no validation epoch ran: the reward adapter is exported without normalization")
        return path
