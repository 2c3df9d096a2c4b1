"""`LitFTCLI`: LightningCLI for lit_ft's modules and datamodules. It names the model once (the datamodule's tokenizer
follows `model.base.name_or_path`), takes every setting from the user (never from a checkpoint), places every output
of a run in the run's own directory (`lit_ft.train.rundirs`) and saves its config with the public class paths."""

from __future__ import annotations

import inspect
import os
import sys
import weakref
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_ft.errors import ConfigError


class LitFTSaveConfig(SaveConfigCallback):
    """Saves `config.yaml` in the run's directory and gives W&B the whole resolved config (trainer and seed too)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        config = self.config.clone().as_dict()
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(_plain(config), allow_val_change=True)


def _plain(value):
    """YAML/JSON-safe values only (W&B and yaml.safe_load read them back)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


class LitFTCLI(LightningCLI):
    """LightningCLI that names the model once (the datamodule's tokenizer follows `model.base.name_or_path`) and
    places every output of a run in the run's own directory (`lit_ft.train.rundirs`)."""

    def __init__(self, *args, **kwargs):
        show_attribute_docstrings()
        kwargs.setdefault("auto_configure_optimizers", False)  # lit_ft's modules configure their own (model.optim)
        kwargs.setdefault("save_config_callback", LitFTSaveConfig)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.base.name_or_path", "data.init_args.tokenizer")
        parser.add_argument(
            "--memory", default=None,
            help="auto (the default on a GPU) | a budget such as 24GiB | off: before a fit loads any weights, its "
                 "memory plan runs the fastest settings that fit the GPU's free memory (auto) or the budget, by a "
                 "step-time model over micro-batch with accumulation, checkpointing, offloading, ... (the run as "
                 "configured unless it does not fit or a faster one fits with room to spare; lit_ft.plan.auto); "
                 "nothing fits: an error naming the smallest budget that would")

    def parse_arguments(self, parser, args) -> None:
        # `main` hands over the command line with recipe names resolved: not a second command line to warn about.
        argv, sys.argv = sys.argv, sys.argv[:1]
        try:
            super().parse_arguments(parser, args)
        finally:
            sys.argv = argv
        self.config = public_class_paths(self.config)

    def _parse_ckpt_path(self) -> None:
        """Settings come from the user, never from a checkpoint: LightningCLI would merge the checkpoint's stored
        hyper-parameters over the command line (another model path, `trust_remote_code`, even another module class).
        lit_ft's modules compare those stored settings with the user's on load instead (`checkpointing.check_resume`:
        refused where a setting cannot change, a `resume:` line where it can)."""

    def _instantiate_trainer(self, config, callbacks):
        # The progress bar: one over the whole run when it is bounded by max_steps (lit_ft.callbacks.progress), unless the
        # config names its own bar or turns bars off.
        from lightning.pytorch.callbacks import ProgressBar

        from lit_ft.callbacks.progress import step_progress_bar

        configured = config.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in [*configured, *callbacks]):
            callbacks = [*callbacks, step_progress_bar()]
        trainer = super()._instantiate_trainer(config, callbacks)
        CLAIMED["trainer"] = weakref.ref(trainer)
        return trainer

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.run_dir = place_run(self.config[self.subcommand], self.subcommand)

    def before_fit(self) -> None:
        memory = self.config[self.subcommand].get("memory")
        if memory != "off":
            from lit_ft.plan.auto import RECORD, fit_memory

            def say(line: str) -> None:
                if self.trainer.is_global_zero:
                    print(f"[lit_ft] {line}", file=sys.stderr, flush=True)

            run_dir = Path(self.run_dir)
            fit_memory(self.model, self.datamodule, self.trainer, str(memory or "auto"), say=say,
                       asked=memory is not None, record=run_dir / RECORD if run_dir.is_dir() else None,
                       resuming=self.config[self.subcommand].get("ckpt_path") is not None)

    def after_fit(self) -> None:
        """`latest` names the newest fit that finished: moved only now, never for a run that failed (an exception
        never reaches here), was interrupted or stopped early by a signal."""
        from lit_ft.train import rundirs

        trainer = self.trainer
        if trainer.is_global_zero and trainer.state.finished and not trainer.interrupted:
            run_dir = Path(self.run_dir)
            rundirs.point_latest(run_dir.parent, run_dir)


def public_class_paths(value):
    """`value` (a parsed config) with every `class_path` that names a public class by a module path written as
    `lit_ft.<Name>`, so the run's saved config.yaml names only paths that do not move."""
    import lit_ft
    from jsonargparse import Namespace

    if isinstance(value, Namespace):
        for key, item in list(vars(value).items()):
            setattr(value, key, public_class_paths(item))
        if isinstance(getattr(value, "class_path", None), str):
            value.class_path = lit_ft.public_name(value.class_path) or value.class_path
    elif isinstance(value, list):
        return [public_class_paths(v) for v in value]
    return value


def show_attribute_docstrings() -> None:
    """`--help` shows the docstring under each dataclass field (ModelSpec, LoraSpec, OptimSpec, ...)."""
    import jsonargparse

    if "docstring_parse_attribute_docstrings" in inspect.signature(jsonargparse.set_parsing_settings).parameters:
        jsonargparse.set_parsing_settings(docstring_parse_attribute_docstrings=True)
    else:  # jsonargparse < 4.35
        jsonargparse.set_docstring_parse_options(attribute_docstrings=True)


CLAIMED: dict = {}
"""The run directory this command claimed (`run_dir`), whether it is a new run (`new`) and its Trainer (`trainer`,
a weak reference), for `discard_refused_run`; `lit_ft.cli.app.main` empties it when a command ends."""


def discard_refused_run() -> bool:
    """After a lit_ft error: remove the directory of a new run that was refused before it did anything (no training
    step, no evaluation or prediction batch, no checkpoint, adapter or predictions: `rundirs.discard_unused`), so a
    bad setting leaves no empty `version_N/` behind. True when removed."""
    from lit_ft.train import rundirs

    run_dir, new, ref = CLAIMED.pop("run_dir", None), CLAIMED.pop("new", False), CLAIMED.pop("trainer", None)
    if run_dir is None or not new:
        return False
    trainer = ref() if ref is not None else None
    return rundirs.discard_unused(Path(run_dir), trained=trainer is not None and _progressed(trainer))


def _progressed(trainer) -> bool:
    """A training step taken, or a batch of `validate`, `test` or `predict` done."""
    loops = [getattr(trainer, name, None) for name in ("validate_loop", "test_loop", "predict_loop")]
    return trainer.global_step > 0 or any(
        loop is not None and loop.batch_progress.total.completed > 0 for loop in loops)


def place_run(config, subcommand: str):
    """Choose the run directory and put the trainer's, the callbacks' and the loggers' output paths in it."""
    from lit_ft.train import rundirs

    trainer = config.trainer
    root = trainer.default_root_dir or "runs"
    ckpt_path = config.get("ckpt_path")
    wanted = {"predict": "predict_file", "test": "test_file"}.get(subcommand)
    data_args = _args(config.get("data")) if config.get("data") is not None else {}
    if wanted and wanted in data_args and not data_args[wanted]:  # before a run directory or a logger is made
        raise ConfigError(f"data.{wanted}: `lit-ft {subcommand}` reads the rows of data.{wanted}; name a file")
    callbacks = trainer.get("callbacks") or []
    checkpoint_dirs = [_args(c).get("dirpath") for c in callbacks if _name(c).endswith("ModelCheckpoint")]
    run_dir, continued = rundirs.choose(root, subcommand, ckpt_path, checkpoint_dirs)
    CLAIMED.clear()
    CLAIMED.update(run_dir=run_dir, new=not continued)  # from here a refusal removes a new run's directory
    if subcommand != "fit" and ckpt_path == "last":
        newest = rundirs.newest_fit(Path(root), checkpoint_dirs)
        if newest is None:
            raise ConfigError(f"--ckpt_path last: no fit run in {root} (trainer.default_root_dir) holds a checkpoint")
        config.ckpt_path = rundirs.last_checkpoint(newest, checkpoint_dirs)
    elif ckpt_path == "last" and continued:  # the run's own: last.ckpt, or its newest good one if that is gone
        config.ckpt_path = rundirs.last_checkpoint(run_dir, checkpoint_dirs, required=False) or "last"
    trainer.default_root_dir = str(run_dir)
    for cb in callbacks:
        args = _args(cb)
        if _name(cb).endswith("ModelCheckpoint") and "enable_version_counter" in args:
            # A run owns its directory: a continued (or moved) run writes its own last.ckpt again, not last-v1.ckpt
            # beside a stale one that `--ckpt_path last` would then pick.
            args["enable_version_counter"] = False
        default = "checkpoints" if _name(cb).endswith("ModelCheckpoint") else None
        for key in rundirs.PATH_ARGS:
            if key in args and (args[key] is not None or default):
                args[key] = rundirs.place(args[key], run_dir, default)
    loggers = trainer.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, (bool, type(None))) and "save_dir" in _args(logger):
            _args(logger)["save_dir"] = rundirs.place(_args(logger)["save_dir"], run_dir, ".")
    os.environ[rundirs.RUN_DIR_ENV] = str(run_dir)  # for the ranks Lightning starts after this one
    what = "continuing" if continued else "writing"
    print(f"[lit_ft] {subcommand}: {what} {run_dir}", file=sys.stderr, flush=True)
    return run_dir


def _name(entry) -> str:
    return str(entry.get("class_path", "")) if hasattr(entry, "get") else type(entry).__name__


def _args(entry):
    init = entry.get("init_args") if hasattr(entry, "get") else None
    if init is None:
        return {}
    return init
