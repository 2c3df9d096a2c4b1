"""Every YAML in configs/ parses and instantiates through the CLI; overrides and links work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lit_ft.cli import LitFTCLI

CONFIGS = sorted(str(p) for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml"))
STAGES = [c for c in CONFIGS if "/strategies/" not in c]


def _cli(args):
    import lightning as L

    return LitFTCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                    run=False, args=args, save_config_callback=None)


@pytest.mark.parametrize("config", STAGES, ids=[Path(c).stem for c in STAGES])
def test_config_instantiates(config, tmp_path):
    cli = _cli(["--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"])
    assert cli.model.__class__.__module__.startswith("lit_ft.")
    assert cli.datamodule.__class__.__module__.startswith("lit_ft.data")
    assert cli.model.model is None, "models are built in configure_model(), not at construction"


def test_overrides_and_model_name_link(tmp_path):
    cli = _cli([
        "--config", "configs/sft.yaml", "--trainer.logger", "false",
        "--model.lora.r", "32", "--data.max_length", "512", "--trainer.precision", "bf16-mixed",
        "--model.base.name_or_path", "some/model",
    ])
    assert cli.model.lora.r == 32
    assert cli.datamodule.max_length == 512
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.datamodule.tokenizer_name == "some/model"
