"""The `lit-ft` command (also `python -m lit_ft` and `train.py`): LightningCLI's fit/validate/test/predict over every
lit_ft module and datamodule (`lit_ft.cli.trainer`), plus `export`, `chat`, `plan` and `demo`. Only what a command
uses is imported: `lit-ft --help` loads neither torch nor Lightning.

    lit-ft fit --config sft                       # a shipped recipe, by name (a path works too)
    lit-ft fit --config sft --ckpt_path last      # continue the newest run in its own directory
    lit-ft predict --config sft --ckpt_path last --data.predict_file prompts.jsonl
    lit-ft export adapter --ckpt runs/sft/latest/checkpoints/last.ckpt --out my_adapter
    lit-ft chat --adapter runs/sft/latest/adapter --prompt "What is 12 + 30?"
    lit-ft demo                                   # SFT -> GRPO on the shipped demo data (--stages sft,reward,ppo: RLHF)
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

from lit_ft.errors import ConfigError, LitFTError

TOOLS = {
    "export": ("lit_ft.cli.export", "write an adapter from a checkpoint, merge it into its base, or convert it to GGUF"),
    "chat": ("lit_ft.cli.chat", "generate with a base model plus an adapter, one-shot (--prompt) or interactive"),
    "judge": ("lit_ft.cli.judge", "score policy adapters' answers with a reward model: win rates, paired SE, KL"),
    "plan": ("lit_ft.cli.plan", "estimate a run's memory before starting it"),
    "demo": ("lit_ft.cli.demo", "run SFT -> GRPO (or --stages sft,reward,ppo) on the shipped demo data"),
}
TRAINER_COMMANDS = {
    "fit": "train (a new run in <default_root_dir>/version_N/, or --ckpt_path last to continue the newest)",
    "validate": "the validation metrics of a checkpoint or adapter",
    "test": "the validation metrics on data.test_file",
    "predict": "generations for the prompts of data.predict_file (written to predictions.jsonl)",
}


def main(args=None) -> None:
    """`lit-ft`: a lit_ft error (bad data, a bad setting) is the user's to fix, so it prints as one line,
    ``error: <message>``, with exit code 2 instead of a traceback through Lightning (``LIT_FT_TRACEBACK=1``
    keeps the traceback). A preemption exits with its own code (143 after SIGTERM)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_third_party()
    args = list(sys.argv[1:] if args is None else args)
    _forget_claimed_run()
    try:
        if not args or args[0] in ("-h", "--help"):
            print(usage())
            return
        if args[0] in TOOLS:
            run_tool(args[0], args[1:])
        elif not nested_help(args):
            run_cli(args)
    except Exception as e:
        ours = lit_ft_cause(e) or pickle_refusal(e, args)
        if ours is None or os.environ.get("LIT_FT_TRACEBACK") == "1":
            raise
        if "lit_ft.cli.trainer" in sys.modules:  # a refused new run leaves no empty run directory
            sys.modules["lit_ft.cli.trainer"].discard_refused_run()
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        _forget_claimed_run()


def _forget_claimed_run() -> None:
    """A command's claimed run directory is its own: never discarded by a later command of the same process."""
    if "lit_ft.cli.trainer" in sys.modules:
        sys.modules["lit_ft.cli.trainer"].CLAIMED.clear()


NOISE = (
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning calling torch's own deprecated API
    r".*`is_gradient_checkpointing` is deprecated.*",  # transformers calling its own deprecated API
)
"""Warnings about third-party code calling third-party code: nothing a user of the command can act on."""


def quiet_third_party() -> None:
    """The command's output keeps what a user can act on: the warnings in `NOISE` and Lightning's advertising tips
    are dropped (every other warning still shows; a Python user of the library keeps all of them)."""
    import logging
    import warnings

    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "💡 Tip:" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoTips) for f in logger.filters):
            logger.addFilter(NoTips())


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
    from lit_ft.cli.trainer import show_attribute_docstrings

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


def pickle_refusal(error: BaseException, args: list[str]) -> ConfigError | None:
    """torch's refusal to unpickle a file this command loads (`weights_only=True`), as one line naming the file: the
    checkpoint of `--ckpt_path` when the command has one."""
    from lit_ft.errors import pickle_cause, refused_pickle

    cause = pickle_cause(error)
    if cause is None:
        return None
    paths = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--ckpt_path"]
    paths += [a.split("=", 1)[1] for a in args if a.startswith("--ckpt_path=")]
    return ConfigError(refused_pickle(f"--ckpt_path {paths[-1]}" if paths else "a file this command loads", cause))


def lit_ft_cause(error: BaseException | None) -> LitFTError | None:
    """The LitFTError in ``error``'s chain (jsonargparse wraps a spec's ConfigError in its own ValueErrors)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, LitFTError):
            return error
        if type(error).__name__ == "MisconfigurationException":  # Lightning's own word for a setting that cannot work
            return ConfigError(f"trainer: {str(error).strip()}")
        if isinstance(error, ValueError) and "`val_check_interval`" in str(error):
            return ConfigError(f"trainer.val_check_interval: {str(error).strip()} (or validate every N steps across "
                               "epochs: --trainer.check_val_every_n_epoch null)")
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOTDIR):
            return ConfigError(f"{error.filename or 'an output path'}: {error.strerror} (check trainer.default_root_dir "
                               "and the output paths: a writable directory with free space)")
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

    from lit_ft.cli.trainer import LitFTCLI
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
