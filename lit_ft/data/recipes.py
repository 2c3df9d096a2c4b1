"""The recipes and demo data lit_ft ships, found by name from any directory.

A checkout keeps them in `configs/` and `data/demo/`; the wheel ships the same files as `lit_ft/configs/` and
`lit_ft/demo_data/` (pyproject's package-dir). `lit-ft fit --config sft` names a recipe without a path (a path still
works), and a data setting written `demo:sft_train.jsonl` names a demo file, so the shipped recipes run from any
directory with nothing copied.
"""

from __future__ import annotations

import os
from pathlib import Path

from lit_ft.errors import ConfigError

DEMO_PREFIX = "demo:"
_PACKAGE = Path(__file__).resolve().parents[1]  # lit_ft/


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def configs_dir() -> Path:
    """Where the shipped recipes are: inside the installed package, else the checkout's `configs/`."""
    found = _first_existing(_PACKAGE / "configs", _PACKAGE.parent / "configs")
    if found is None:
        raise ConfigError("lit_ft's recipes are missing from this installation (no lit_ft/configs/)")
    return found


def demo_dir() -> Path:
    """Where the demo data is: inside the installed package, else the checkout's `data/demo/`."""
    found = _first_existing(_PACKAGE / "demo_data", _PACKAGE.parent / "data" / "demo")
    if found is None:
        raise ConfigError("lit_ft's demo data is missing from this installation (no lit_ft/demo_data/)")
    return found


def recipe_names() -> list[str]:
    """Shipped recipe names: `sft`, `reward`, ..., and `strategies/ddp` (folders of recipes are part of the name)."""
    root = configs_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def resolve_config(value: str) -> str:
    """A `--config` value: an existing file as it is, else a shipped recipe's name (`sft`, `strategies/fsdp`,
    `sft.yaml`). Anything else is returned unchanged, so the parser reports it as a missing file."""
    if os.path.exists(value) or value.startswith("{") or "\n" in value:  # a file, or inline YAML/JSON
        return value
    name = value[:-5] if value.endswith(".yaml") else value
    root = configs_dir()
    candidate = root / f"{name}.yaml"
    if ".." not in Path(name).parts and not os.path.isabs(name) and candidate.is_file():
        return str(candidate)
    return value


def resolve_config_args(args: list[str]) -> list[str]:
    """`args` with every `--config NAME` / `--config=NAME` replaced by the recipe file it names."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_config(arg.split("=", 1)[1])
    return out


def resolve_source(source: str, setting: str = "data.train_file") -> str:
    """A data setting: `demo:NAME` is the shipped demo file NAME; anything else is returned unchanged."""
    if not isinstance(source, str) or not source.startswith(DEMO_PREFIX):
        return source
    name = source[len(DEMO_PREFIX):]
    path = demo_dir() / name
    if "/" in name or not path.is_file():
        available = ", ".join(sorted(p.name for p in demo_dir().glob("*.jsonl")))
        raise ConfigError(f"{setting}: {source!r} names no demo file (there are: {available})")
    return str(path)
