"""SFT or reward modelling under DDP on the CPU (gloo), run by tests/test_ddp.py as a script: Lightning's launcher
re-runs this file for rank 1, as it does `train.py` under `strategy: ddp`.

    python tests/ddp_run.py STAGE OUT MODEL_DIR TRAIN_FILE DEVICES MAX_STEPS [CKPT_PATH]

STAGE is `sft` (instruction rows) or `reward` (preference pairs).
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.data.modules import InstructionDataModule, PreferenceDataModule
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.optim import OptimSpec
from lit_ft.resume import AtomicCheckpointIO
from lit_ft.reward import RewardModule
from lit_ft.sft import SFTModule

# stage -> (data module, LightningModule); both take the same arguments.
STAGES = {"sft": (InstructionDataModule, SFTModule), "reward": (PreferenceDataModule, RewardModule)}


class LocalLosses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def main(stage: str, out: str, model_dir: str, train_file: str, devices: int, max_steps: int,
         ckpt_path: str | None = None):
    out = Path(out)
    datamodule, module_class = STAGES[stage]
    L.seed_everything(0)
    # The global batch is 4 rows (reward: 4 pairs): 4 on one process, 2 on each of two.
    dm = datamodule(train_file=train_file, val_split=0.0, tokenizer=model_dir, batch_size=4 // devices,
                    max_length=64)
    module = module_class(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                          optim=OptimSpec(lr=1e-2, warmup_ratio=0.0, scheduler="constant"))
    rec = LocalLosses()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=max_steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        limit_val_batches=0, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        callbacks=[rec, ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, every_n_train_steps=2)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    tag = "resumed" if ckpt_path else "run"
    (out / f"{tag}_losses_rank{trainer.global_rank}.json").write_text(json.dumps(rec.losses))
    if trainer.is_global_zero:
        torch.save({n: p.detach() for n, p in module.named_parameters() if p.requires_grad}, out / f"{tag}_adapter.pt")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), a[6] if len(a) > 6 else None)
