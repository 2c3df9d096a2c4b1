"""One output root, one directory a run: where the `lit-ft` command puts everything a run writes.

`trainer.default_root_dir` (say `runs/sft`) is the only output setting of a recipe. Each `fit` gets its own
`runs/sft/version_N/` (N = the next free number, claimed with an atomic `mkdir`, so two fits started together
never share one), and the callbacks' and loggers' relative paths are placed inside it: `checkpoints/`, `adapter/`,
`metrics.png`, the W&B files and `config.yaml`. `runs/sft/latest` is a symlink to the newest fit that FINISHED
(moved by the command when its fit returns, never at the start: a run that fails, is interrupted or trained nothing
leaves it on the last good one), so a later stage names `runs/sft/latest/adapter`. `fit --ckpt_path last` continues
the newest run that holds a checkpoint, in its own directory (its own `last.ckpt`, never another run's); a
checkpoint inside `version_N/` continues run N. `validate`, `test` and `predict` get `validate_N/`, `test_N/`,
`predict_N/` beside the fits, so they never overwrite a fit's config, and their `--ckpt_path last` is the newest
checkpointed fit's `last.ckpt`. The lock of `runs.RunLock` is then taken per run
directory: a second fit into the same run (a double resume) is refused, fits of new runs are not. A new run refused
before it trained or wrote anything (a bad setting, a missing file) leaves no directory behind (`discard_unused`).

Under DDP, Lightning starts the other ranks as copies of the command after rank 0 chose the directory; rank 0
passes it on in `LIT_FT_RUN_DIR`, which only ranks other than 0 read.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from lit_ft.errors import ConfigError

FIT_PREFIX = "version_"
LATEST = "latest"
RUN_DIR_ENV = "LIT_FT_RUN_DIR"
KEPT = (".ckpt", ".safetensors", ".jsonl")
"""What makes a refused run's directory worth keeping: a checkpoint, an adapter, predictions."""
PATH_ARGS = ("dirpath", "save_dir", "path")
"""Callback and logger arguments that name an output path: relative values are placed in the run directory."""


def numbered(root: Path, prefix: str) -> list[tuple[int, Path]]:
    """`(N, root/prefixN)` of the existing numbered directories, in order of N."""
    if not root.is_dir():
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found)


def newest_fit(root: Path, checkpoint_dirs: list[str | None] | None = None) -> Path | None:
    """The newest fit run under `root` that holds a checkpoint (what `--ckpt_path last` continues or evaluates): the
    highest `version_N` with a `.ckpt` file in one of its checkpoint folders; None when no run has one."""
    for _, run in reversed(numbered(root, FIT_PREFIX)):
        folders = [Path(place(d, run, "checkpoints")) for d in checkpoint_dirs or [None]]
        if any(f.is_dir() and any(f.glob("*.ckpt")) for f in folders):
            return run
    return None


def finished_fit(root: Path) -> Path | None:
    """Where `root/latest` points: the newest fit that finished (None before the first)."""
    link = root / LATEST
    if not (link.is_symlink() and link.resolve().is_dir()):
        return None
    target = Path(os.readlink(link))
    return target if target.is_absolute() else root / target


def claim(root: Path, prefix: str) -> Path:
    """Create and return the next free `root/prefixN` (`mkdir` is atomic: concurrent claims get different N)."""
    root.mkdir(parents=True, exist_ok=True)
    n = numbered(root, prefix)[-1][0] + 1 if numbered(root, prefix) else 0
    while True:
        path = root / f"{prefix}{n}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1


def point_latest(root: Path, run_dir: Path) -> None:
    """`root/latest` -> `run_dir` (relative), replaced atomically: called when a fit has finished."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, root / LATEST)


def run_of(root: Path, ckpt_path: str) -> Path | None:
    """The fit run directory under `root` that holds `ckpt_path` (None for a checkpoint from elsewhere)."""
    ckpt = Path(ckpt_path).resolve()
    for _, run in numbered(root, FIT_PREFIX):
        if run.resolve() in ckpt.parents:
            return run
    return None


def discard_unused(run_dir: Path, trained: bool) -> bool:
    """Remove the directory a NEW run claimed when its command was refused before the run produced anything: no
    step trained and no checkpoint, adapter or predictions inside (only what a start writes: the config, the memory
    plan's record, the loggers' opening files). True when removed; ranks other than 0 never remove."""
    if trained or _other_rank() or not run_dir.is_dir():
        return False
    if any(p.suffix in KEPT for p in run_dir.rglob("*") if p.is_file()):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


def _other_rank() -> bool:
    return any(os.environ.get(k, "0") not in ("", "0") for k in ("LOCAL_RANK", "RANK", "NODE_RANK"))


def choose(root: str | os.PathLike, subcommand: str, ckpt_path: str | None,
           checkpoint_dirs: list[str | None] | None = None) -> tuple[Path, bool]:
    """(the run directory of this command, whether it continues an existing fit run)."""
    if _other_rank() and os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]), True
    root = Path(root)
    if subcommand == "fit":
        existing = (newest_fit(root, checkpoint_dirs) if ckpt_path == "last"
                    else run_of(root, ckpt_path) if ckpt_path else None)
        if existing is not None:
            return existing, True
        if _other_rank():  # started by an outside launcher (torchrun, srun) before rank 0 chose: follow rank 0
            return _wait_for_newest(root), True
        return claim(root, FIT_PREFIX), False
    return claim(root, f"{subcommand}_"), False


def _wait_for_newest(root: Path, seconds: float = 60.0) -> Path:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = numbered(root, FIT_PREFIX)
        run = runs[-1][1] if runs else None
        if run is not None and time.time() - run.stat().st_mtime < seconds:
            return run
        time.sleep(0.5)
    raise ConfigError(f"trainer.default_root_dir: rank 0 made no run directory in {root} within {seconds:.0f} s; "
                      f"set {RUN_DIR_ENV} for every rank")


def place(value: str | None, run_dir: Path, default: str | None = None) -> str | None:
    """An output path of a callback or logger: relative (or None, given `default`) -> inside the run directory."""
    if value is None:
        value = default
    if value is None or os.path.isabs(os.path.expanduser(value)):
        return value
    return os.path.normpath(str(run_dir / value))


def last_checkpoint(run_dir: Path, checkpoint_dirs: list[str | None], required: bool = True) -> str | None:
    """What `--ckpt_path last` means in the fit run in `run_dir`: its `last.ckpt`, else (deleted, or never written)
    the newest checkpoint there that verifies, said in one line; with none, a ConfigError (or None when not
    `required`: a fit that never saved starts from the beginning)."""
    from lit_ft.train.integrity import newest_verified

    folders = [Path(place(d, run_dir, "checkpoints")) for d in checkpoint_dirs or [None]]
    for folder in folders:
        if (folder / "last.ckpt").is_file():
            return str(folder / "last.ckpt")
    for folder in folders:
        newest = newest_verified(folder) if folder.is_dir() else None
        if newest is not None:
            print(f"[lit_ft] --ckpt_path last: {folder} has no last.ckpt; resuming from {newest.name}, its newest "
                  "checkpoint that verifies", file=sys.stderr, flush=True)
            return str(newest)
    if not required:
        return None
    raise ConfigError(f"--ckpt_path last: the newest run, {run_dir}, has no checkpoints/last.ckpt")
