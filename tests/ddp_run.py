"""SFT or reward modelling under DDP on the CPU (gloo), run by tests/test_ddp.py as a script: Lightning's launcher
re-runs this file for rank 1, as it does `train.py` under `strategy: ddp`.

    python tests/ddp_run.py STAGE OUT MODEL_DIR TRAIN_FILE DEVICES MAX_STEPS [CKPT_PATH]

STAGE is `sft` (instruction rows), `reward`, `dpo` or `kto` (preference pairs; KTO reads each as two examples), `ppo`
or `grpo` (prompts; one epoch of rollouts of a global batch of 4, MAX_STEPS unused). Every rank writes its losses
(KTO: and its reference point z0) and its trainable weights.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_ft.data.modules import InstructionDataModule, PreferenceDataModule, PromptDataModule, UnpairedPreferenceDataModule
from lit_ft.stages.dpo import DPOModule
from lit_ft.stages.kto import KTOModule
from lit_ft.models import LoraSpec, ModelSpec
from lit_ft.train.optim import OptimSpec
from lit_ft.train.resume import AtomicCheckpointIO
from lit_ft.stages.reward import RewardModule
from lit_ft.stages.sft import SFTModule

# stage -> (data module, LightningModule); both take the same arguments.
STAGES = {"sft": (InstructionDataModule, SFTModule), "reward": (PreferenceDataModule, RewardModule),
          "dpo": (PreferenceDataModule, DPOModule), "kto": (UnpairedPreferenceDataModule, KTOModule)}


class LocalLosses(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:  # PPO, GRPO (manual optimization returns nothing): the policy loss, the mean reward
            key = "ppo/loss/policy" if "ppo/loss/policy" in trainer.callback_metrics else "train/reward"
            self.losses[batch_idx + 1] = trainer.callback_metrics[key].item()
        else:  # this rank's mean loss and its weight (loss tokens; reward: 1, equal pairs per rank)
            m = trainer.callback_metrics
            weight = m.get("train/loss_tokens", torch.tensor(1.0)).item()
            self.losses[trainer.global_step] = [m["train/loss"].item(), weight] + (
                [m["train/kl"].item()] if "train/kl" in m else [])  # KTO: z0, from every rank's mismatched pairs


def _shipped_ddp():
    """DDPStrategy with the settings of configs/strategies/ddp.yaml, so the tests run what users run."""
    import yaml
    from lightning.pytorch.strategies import DDPStrategy

    config = yaml.safe_load((Path(__file__).parents[1] / "configs/strategies/ddp.yaml").read_text())
    return DDPStrategy(**config["trainer"]["strategy"]["init_args"])


def main(stage: str, out: str, model_dir: str, train_file: str, devices: int, max_steps: int,
         ckpt_path: str | None = None):
    out = Path(out)
    L.seed_everything(0)
    # The global batch is 4 rows (reward: 4 pairs; PPO: 4 prompts a rollout): 4 on one process, 2 on each of two.
    data = dict(train_file=train_file, val_split=0.0, tokenizer=model_dir, batch_size=4 // devices, max_length=64)
    if stage == "ppo":
        from tests.test_resume import _ppo_module

        dm, module, length = PromptDataModule(**data, answer_field=None), _ppo_module(model_dir), dict(max_epochs=1)
    elif stage == "grpo":
        from tests.test_resume import _grpo_module

        # Dynamic sampling with a reward that is constant for half the prompts: the ranks keep different numbers of
        # rows (at times none), and still take the same optimizer steps.
        module = _grpo_module(model_dir, "tests.test_grpo.half_constant_reward", 2, dynamic_sampling=True)
        dm, length = PromptDataModule(**data, answer_field=None), dict(max_epochs=1)
    else:
        datamodule, module_class = STAGES[stage]
        dm = datamodule(**data)
        module = module_class(base=ModelSpec(name_or_path=model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                              optim=OptimSpec(lr=1e-2, warmup_ratio=0.0, scheduler="constant"))
        length = dict(max_steps=max_steps)
    rec = LocalLosses()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=_shipped_ddp() if devices > 1 else "auto", **length,
        logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
        limit_val_batches=0, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        callbacks=[rec, ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, every_n_train_steps=2)],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    tag = "resumed" if ckpt_path else "run"
    (out / f"{tag}_losses_rank{trainer.global_rank}.json").write_text(json.dumps(rec.losses))
    torch.save({n: p.detach() for n, p in module.named_parameters() if p.requires_grad},
               out / f"{tag}_adapter_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0], a[1], a[2], a[3], int(a[4]), int(a[5]), a[6] if len(a) > 6 else None)
