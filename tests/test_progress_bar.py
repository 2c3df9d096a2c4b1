"""The TTY progress bar (issue 22, item 7): a run bounded by `max_steps` (max_epochs -1, as the recipes) shows one
bar over the whole run, steps done of the total with an ETA, instead of "Epoch 0/-2" and a bar per epoch."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from lit_ft.callbacks.progress import StepRichProgressBar, StepTQDMProgressBar

REPO = Path(__file__).resolve().parents[1]


class Record(L.Callback):
    """What the training bar shows after every batch (runs after the bar: it comes later in the callback list)."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        bar = trainer.progress_bar_callback
        if isinstance(bar, StepRichProgressBar):
            task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
            self.rows.append((trainer.global_step, task.completed, task.total, task.description.strip(),
                              task.time_remaining))
        else:
            tq = bar.train_progress_bar
            remaining = tq.format_meter(**{**tq.format_dict, "bar_format": "{remaining}"})
            self.rows.append((trainer.global_step, tq.n, tq.total, tq.desc.removesuffix(": "), remaining))


def _fit(tiny_model_dir, tmp_path, bar, ckpt_path=None, **trainer_args):
    from lit_ft import InstructionDataModule, LoraSpec, ModelSpec, OptimSpec, SFTModule

    rows = [json.loads(x) for x in (REPO / "data/demo/sft_train.jsonl").read_text().splitlines()[:16]]
    data = tmp_path / "small.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, dropout=0.0),
                       optim=OptimSpec(lr=1e-3, min_lr_ratio=0.1))  # extended on resume: a floor above 0
    dm = InstructionDataModule(train_file=str(data), val_file=str(data), tokenizer=tiny_model_dir, max_length=64,
                               batch_size=4)  # 16 rows: 4 batches an epoch
    record = Record()
    extra = trainer_args.pop("callbacks_extra", None)
    trainer_args.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(callbacks=[bar, record, *([extra] if extra else [])], logger=False,
                        default_root_dir=str(tmp_path), limit_val_batches=0, num_sanity_val_steps=0,
                        enable_model_summary=False, **trainer_args)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return record.rows


@pytest.mark.parametrize("bar", [StepRichProgressBar, StepTQDMProgressBar])
def test_a_step_bounded_run_is_one_bar_of_steps_with_an_eta(bar, tiny_model_dir, tmp_path):
    # 5 optimizer steps of 2 accumulated batches: epochs 0, 1 and 2 (4 batches = 2 steps each).
    rows = _fit(tiny_model_dir, tmp_path, bar(), max_steps=5, accumulate_grad_batches=2)
    assert len(rows) == 10
    steps = [(batch + 1) // 2 for batch in range(10)]  # the step counter after each batch, by hand
    assert [r[:3] for r in rows] == [(s, s, 5) for s in steps]  # not reset at the epoch boundaries
    assert [r[3] for r in rows] == [f"Step (epoch {b // 4})" for b in range(10)]
    for _, done, total, _, eta in rows:
        if 2 <= done < total:  # a speed is known once two steps are done
            assert (eta > 0) if bar is StepRichProgressBar else (eta != "?" and ":" in eta), (done, eta)


def test_a_resumed_run_continues_the_bar_from_its_step(tiny_model_dir, tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    save = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _fit(tiny_model_dir, tmp_path, StepRichProgressBar(), max_steps=3, enable_checkpointing=True, callbacks_extra=save)
    rows = _fit(tiny_model_dir, tmp_path, StepRichProgressBar(), max_steps=6,
                ckpt_path=str(tmp_path / "ckpt/last.ckpt"))
    assert [r[:3] for r in rows] == [(s, s, 6) for s in (4, 5, 6)]  # from step 3 of 6, not 0 of a new epoch


def test_an_epoch_bounded_run_keeps_a_bar_per_epoch(tiny_model_dir, tmp_path):
    rows = _fit(tiny_model_dir, tmp_path, StepRichProgressBar(), max_epochs=2)
    assert [r[1:4] for r in rows] == [(b % 4 + 1, 4, f"Epoch {b // 4}/1") for b in range(8)]


def test_lit_ft_uses_the_step_bar_unless_the_config_names_one(tiny_model_dir):
    from lit_ft.cli.trainer import LitFTCLI
    from lit_ft.data.recipes import resolve_config

    def bar(*extra):
        cli = LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", resolve_config("sft"), "--trainer.logger", "false",
                                        "--model.init_args.base.name_or_path", tiny_model_dir, *extra])
        return cli.trainer.progress_bar_callback

    assert type(bar()) is StepRichProgressBar
    assert bar("--trainer.enable_progress_bar", "false") is None
    own = bar("--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar")
    assert type(own).__name__ == "TQDMProgressBar"
