"""What the offline preference stages (DPO, KTO) share, as plain functions bound as methods
(`configure_model = offline.configure_model`), as `lit_ft.online.shared` is for PPO and GRPO.

Both train a LoRA policy against a frozen reference on ONE base (`lit_ft.online.roles`): the policy is a trainable
copy of the SFT adapter and the reference the frozen SFT adapter, or without one a new LoRA against the bare base
(PEFT's `disable_adapter`). Here: building them, the strategies refused, the reference's log-probs computed once
before training when asked (`dpo_ref.ReferenceTable`, kept in the checkpoint under the module's `REF_KEY`), the
optimizer, the checkpoint hooks and the export of the policy.

A module using them names its settings section in `SECTION` (`"dpo"`, `"kto"`): its spec is the attribute of that
name (with `disable_dropout`, `precompute_ref`, `ref_batch_size`) and errors name `model.<SECTION>.<setting>`. It
also sets `REF_KEY` and `DIGEST_COLUMNS` (the tokenized columns its reference table is keyed by), and a
`reference_logps(batch)` returning a tuple of [B] tensors, one for each sequence of a row that the table keeps.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lit_ft.errors import ConfigError
from lit_ft.models import compile_decoder_layers, describe
from lit_ft.online import roles
from lit_ft.stages import dpo_ref
from lit_ft.train import checkpointing, guards, optim, strategies
from lit_ft.train.guards import GUARD_KEY

UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


def spec(module):
    """The module's settings section (`module.dpo`, `module.kto`)."""
    return getattr(module, module.SECTION)


def configure_model(self) -> None:
    """The policy and reference adapters on one base (idempotent), dropout off when the spec says so."""
    if self.model is not None:
        return
    device = strategies.model_device(self, self.base)
    # "shared_trunk" and no reward export: build_roles adds no value or reward adapter, only policy and ref.
    model, trainable = roles.build_roles(self.base, self.lora, self.sft_adapter, None, "shared_trunk", device)
    if spec(self).disable_dropout:
        roles.disable_dropout(model)
    if self.compile_layers:
        compile_decoder_layers(model, eager_on_error=getattr(self, "compile_planned", False))
    self.model, self.roles = model, roles.AdapterRoles(model, trainable)
    rank_zero_info(describe(model))


def setup(self, stage: str) -> None:
    name = type(self.trainer.strategy).__name__
    if name in UNSUPPORTED_STRATEGIES:
        raise ConfigError(f"trainer.strategy: {self.SECTION.upper()} under {name.removesuffix('Strategy')} is not "
                          "supported (the policy and reference adapters switch on one base); use "
                          "configs/strategies/ddp.yaml, with a 4-bit base (model.base.quantization nf4) for large "
                          "models")


# -- precomputed reference ----------------------------------------------------------------------------------


def ensure_reference(self, split: str, dataset) -> None:
    """Compute the split's reference table unless one for this exact dataset is held (from a checkpoint)."""
    s = spec(self)
    if not s.precompute_ref or getattr(self, "reference_free", False) or dataset is None or len(dataset) == 0:
        return
    setting = f"model.{self.SECTION}.precompute_ref"
    digest = dpo_ref.dataset_digest(dataset, self.DIGEST_COLUMNS, setting)
    if split in self.ref_tables and self.ref_tables[split].digest == digest:
        return
    collator = getattr(self.trainer.datamodule, "collator", None)
    if collator is None:
        raise ConfigError(f"{setting}: the datamodule needs a collator() method, as lit_ft's DataModules have (its "
                          "batches are what the pass reads)")
    with self.trainer.precision_plugin.forward_context():  # the same autocast as the training forward
        table = dpo_ref.compute_table(self, dataset, collator(), s.ref_batch_size, digest, self.TABLE_KEY)
    self.ref_tables[split] = table
    self.precomputed.append(split)
    rank_zero_info(f"{self.SECTION.upper()}: reference log-probs of {len(table.lines)} {split} rows computed "
                   f"(digest {digest[:12]})")


def on_fit_start(self) -> None:
    dm = self.trainer.datamodule
    ensure_reference(self, "train", getattr(dm, "train_dataset", None))
    ensure_reference(self, "val", getattr(dm, "val_dataset", None))


def on_validation_start(self) -> None:
    ensure_reference(self, "val", getattr(self.trainer.datamodule, "val_dataset", None))


# -- optimizer, checkpoints and export ----------------------------------------------------------------------


def configure_optimizers(self):
    self.roles.restore_flags()
    return optim.configure(self, self.optim, self.trainer.estimated_stepping_batches)


def on_save_checkpoint(self, checkpoint: dict) -> None:
    self.roles.restore_flags()
    extra = {GUARD_KEY: self.guard.state_dict()}
    if self.ref_tables:
        extra[self.REF_KEY] = {split: t.state() for split, t in self.ref_tables.items()}
    checkpointing.slim(self, checkpoint, self.base.identity(), extra=extra)


def on_load_checkpoint(self, checkpoint: dict) -> None:
    checkpointing.check_resume(self, checkpoint, self.base.identity())
    guards.restore(self, checkpoint)
    for split, state in checkpoint.get(self.REF_KEY, {}).items():
        self.ref_tables[split] = dpo_ref.ReferenceTable.from_state(state)


def save_adapter(self, path: str | Path, tokenizer=None) -> Path:
    """Export the policy adapter in PEFT format (what `PeftModel.from_pretrained` and `lit_ft.cli.export merge`
    load), with the tokenizer files and the base identity."""
    path = roles.export_adapter(self.model, roles.POLICY, Path(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    checkpointing.write_base_identity(path, self.base.identity())
    return path
