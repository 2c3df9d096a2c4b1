"""The `lit-ft` command (also `python -m lit_ft` and `train.py`): LightningCLI's fit/validate/test/predict over every
lit_ft module and datamodule, plus `export`, `chat`, `plan` and `demo`.

    lit-ft fit --config sft                       # a shipped recipe, by name (a path works too)
    lit-ft fit --config sft --ckpt_path last      # continue the newest run in its own directory
    lit-ft predict --config sft --ckpt_path last --data.predict_file prompts.jsonl
    lit-ft export adapter --ckpt runs/sft/latest/checkpoints/last.ckpt --out my_adapter
    lit-ft chat --adapter runs/sft/latest/adapter --prompt "What is 12 + 30?"
    lit-ft demo                                   # SFT -> GRPO on the shipped demo data (--stages sft,reward,ppo: RLHF)
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from lit_ft.errors import ConfigError, LitFTError

TOOLS = {
    "export": ("lit_ft.cli.export", "write an adapter from a checkpoint, merge it into its base, or convert it to GGUF"),
    "chat": ("lit_ft.cli.chat", "generate with a base model plus an adapter, one-shot (--prompt) or interactive"),
    "plan": ("lit_ft.cli.plan", "estimate a run's memory before starting it"),
    "demo": ("lit_ft.cli.demo", "run SFT -> GRPO (or --stages sft,reward,ppo) on the shipped demo data"),
}
TRAINER_COMMANDS = {
    "fit": "train (a new run in <default_root_dir>/version_N/, or --ckpt_path last to continue the newest)",
    "validate": "the validation metrics of a checkpoint or adapter",
    "test": "the validation metrics on data.test_file",
    "predict": "generations for the prompts of data.predict_file (written to predictions.jsonl)",
}


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
        return super()._instantiate_trainer(config, callbacks)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.run_dir = place_run(self.config[self.subcommand], self.subcommand)


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


def place_run(config, subcommand: str):
    """Choose the run directory and put the trainer's, the callbacks' and the loggers' output paths in it."""
    from lit_ft.train import rundirs

    trainer = config.trainer
    root = trainer.default_root_dir or "runs"
    ckpt_path = config.get("ckpt_path")
    run_dir, continued = rundirs.choose(root, subcommand, ckpt_path)
    callbacks = trainer.get("callbacks") or []
    checkpoint_dirs = [_args(c).get("dirpath") for c in callbacks if _name(c).endswith("ModelCheckpoint")]
    if subcommand != "fit" and ckpt_path == "last":
        newest = rundirs.newest_fit(Path(root))
        if newest is None:
            raise ConfigError(f"--ckpt_path last: no fit run in {root} (trainer.default_root_dir)")
        config.ckpt_path = rundirs.last_checkpoint(newest, checkpoint_dirs)
    trainer.default_root_dir = str(run_dir)
    for cb in callbacks:
        args = _args(cb)
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


def main(args=None) -> None:
    """`lit-ft`: a lit_ft error (bad data, a bad setting) is the user's to fix, so it prints as one line,
    ``error: <message>``, with exit code 2 instead of a traceback through Lightning (``LIT_FT_TRACEBACK=1``
    keeps the traceback). A preemption exits with its own code (143 after SIGTERM)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if args is None else args)
    try:
        if not args or args[0] in ("-h", "--help"):
            print(usage())
            return
        if args[0] in TOOLS:
            run_tool(args[0], args[1:])
        elif not nested_help(args):
            run_cli(args)
    except Exception as e:
        ours = lit_ft_cause(e)
        if ours is None or os.environ.get("LIT_FT_TRACEBACK") == "1":
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def usage() -> str:
    lines = ["usage: lit-ft COMMAND [options]   (lit-ft COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {k:<9} {v}" for k, v in TRAINER_COMMANDS.items()]
    lines += [f"  {k:<9} {v}" for k, (_, v) in TOOLS.items()]
    from lit_ft.data.recipes import recipe_names

    lines += ["", "recipes (--config NAME): " + ", ".join(recipe_names())]
    return "\n".join(lines)


def nested_help(args: list[str]) -> bool:
    """`--model.lora.help` / `--data.X.help`: the fields of one nested setting (a dataclass such as LoraSpec) with
    their descriptions. jsonargparse offers help for the module class only (`--model.help CLASS`). Returns whether
    help was printed."""
    import importlib
    import re
    import typing

    import yaml
    from jsonargparse import ArgumentParser

    from lit_ft.data.recipes import resolve_config_args

    asked = [m for a in args if (m := re.fullmatch(r"--(model|data)\.(?:init_args\.)?(\w+)\.help", a))]
    if not asked:
        return False
    section, field = asked[0].groups()
    class_path = None
    resolved = resolve_config_args(args)
    for i, a in enumerate(resolved):
        if a == f"--{section}" and i + 1 < len(resolved):
            class_path = resolved[i + 1]
        elif a == "--config" and i + 1 < len(resolved) and os.path.isfile(resolved[i + 1]):
            with open(resolved[i + 1]) as f:
                class_path = ((yaml.safe_load(f) or {}).get(section) or {}).get("class_path", class_path)
    if not class_path or "." not in class_path:
        raise ConfigError(f"--{section}.{field}.help: name the {section} class first (--config RECIPE or "
                          f"--{section} CLASS_PATH)")
    module, _, name = class_path.rpartition(".")
    hints = typing.get_type_hints(getattr(importlib.import_module(module), name).__init__)
    spec = next((t for t in typing.get_args(hints.get(field)) or (hints.get(field),) if isinstance(t, type)
                 and hasattr(t, "__dataclass_fields__")), None)
    if spec is None:
        raise ConfigError(f"--{section}.{field}.help: {class_path}'s {field!r} is not a group of settings")
    show_attribute_docstrings()
    parser = ArgumentParser(prog=f"lit-ft fit ... --{section}.{field}.X VALUE", description=spec.__doc__)
    parser.add_class_arguments(spec, f"{section}.{field}")
    parser.print_help()
    return True


def run_tool(name: str, argv: list[str]) -> None:
    import importlib

    module_name, _ = TOOLS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ConfigError(f"`lit-ft {name}` is not available in this version of lit_ft ({module_name} is missing)")
    from lit_ft.data.recipes import resolve_config_args

    code = module.main(resolve_config_args(argv) if name == "plan" else argv)  # `plan --config sft` names a recipe
    if isinstance(code, int) and code:  # a tool's `main` may return its exit status
        raise SystemExit(code)


def lit_ft_cause(error: BaseException | None) -> LitFTError | None:
    """The LitFTError in ``error``'s chain (jsonargparse wraps a spec's ConfigError in its own ValueErrors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitFTError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report_module_paths(args: list[str]) -> dict[str, str]:
    """One FutureWarning for every public class that the command line or a `--config` file names by a module path
    (`lit_ft.sft.SFTModule`, `lit_ft.data.modules.InstructionDataModule`) instead of `lit_ft.<Name>`: module paths
    are internal and may move. Returns {old path: new path}."""
    import re
    import warnings

    import lit_ft

    texts = []
    for i, arg in enumerate(args):
        value = args[i + 1] if arg == "--config" and i + 1 < len(args) else arg.partition("=")[2] \
            if arg.startswith("--config=") else None
        texts.append(Path(value).read_text(errors="replace") if value and os.path.isfile(value) else arg)
    found = {}
    for text in texts:
        for path in re.findall(r"\blit_ft(?:\.\w+)+", text):
            if (new := lit_ft.public_name(path)) is not None:
                found[path] = new
    if found:
        lit_ft.WARNED.update(path.rpartition(".")[0] for path in found)  # said here, not again on import
        pairs = ", ".join(f"{old} -> {new}" for old, new in sorted(found.items()))
        warnings.warn(f"the config names classes by their module paths, which may move; name them from lit_ft: "
                      f"{pairs}", FutureWarning, stacklevel=2)
    return found


def run_cli(args=None) -> None:
    import lightning as L

    from lit_ft.data.recipes import resolve_config_args

    args = resolve_config_args(list(sys.argv[1:] if args is None else args))
    report_module_paths(args)
    try:
        LitFTCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},  # a continued run rewrites its own config; new runs get new dirs
            args=args,
        )
    finally:
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()  # the run ends with the command (W&B's service then completes its files), not at exit


if __name__ == "__main__":
    main()
