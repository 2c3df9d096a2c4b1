"""The `train.py` entry point: LightningCLI over every lit_ft module and datamodule."""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI


class LitFTCLI(LightningCLI):
    """LightningCLI that names the model once: the datamodule's tokenizer follows `model.base.name_or_path`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.base.name_or_path", "data.init_args.tokenizer")


def main(args=None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning as L

    LitFTCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
