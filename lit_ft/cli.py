"""The `train.py` entry point: LightningCLI over every lit_ft module and datamodule."""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from lit_ft.errors import LitFTError


class LitFTCLI(LightningCLI):
    """LightningCLI that names the model once: the datamodule's tokenizer follows `model.base.name_or_path`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.base.name_or_path", "data.init_args.tokenizer")


def main(args=None) -> None:
    """`train.py`: a lit_ft error (bad data, a bad setting) is the user's to fix, so it prints as one line,
    ``error: <message>``, with exit code 2 instead of a traceback through Lightning (``LIT_FT_TRACEBACK=1``
    keeps the traceback)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_cli(args)
    except Exception as e:
        ours = lit_ft_cause(e)
        if ours is None or os.environ.get("LIT_FT_TRACEBACK") == "1":
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def lit_ft_cause(error: BaseException | None) -> LitFTError | None:
    """The LitFTError in ``error``'s chain (jsonargparse wraps a spec's ConfigError in its own ValueErrors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitFTError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def run_cli(args=None) -> None:
    import lightning as L

    LitFTCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
