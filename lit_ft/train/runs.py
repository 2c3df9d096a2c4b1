"""A run's directory: one run at a time (a lock), stale temporary files swept, preemption handled, atomic exports.

- `RunLock`: a fit takes an exclusive `flock` on `<dir>/.lit_ft.lock` in its output directories (the Trainer's
  `default_root_dir` and every checkpoint directory); a second fit into a directory in use is refused with a
  message naming the directory and the run holding it (pid, host, start time, command). The kernel drops the lock
  when the process ends, however it ends (kill -9 included), so a killed run never blocks its own resume. After
  taking the lock, the temporary files of killed checkpoint writes and exports are removed.
- `Preemption`: on SIGTERM (spot preemption, SLURM's and Kubernetes' stop) or SLURM's requeue signal (SIGUSR1 by
  default, `#SBATCH --signal=USR1@90`) the run finishes the optimizer step it is in, writes `last.ckpt` atomically
  in its checkpoint directory and exits with code 128 + the signal number (143 for SIGTERM), so a scheduler sees a
  preemption rather than success; `fit --ckpt_path last` then resumes exactly. Under SLURM, SIGUSR1 also requeues
  the job (`scontrol requeue`, as Lightning's SLURM handler does). It replaces Lightning's own SIGTERM
  handler while training, which stops after the current *micro-batch* (inside a gradient-accumulation window, losing
  the window's gradients) and exits with code 0.
- `atomic_directory`: an export is written into a temporary sibling and renamed into place, so a kill during the
  export leaves the previous directory (or none), never a partial one.

`lit_ft.train.resume.configure_callbacks` adds `RunLock` and `Preemption` to every lit_ft module's Trainer (with or
without the CLI) unless the Trainer already has one of the type.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.errors import ConfigError

LOCK_FILE = ".lit_ft.lock"
_TMP_FILE_GLOB = ".*.tmp"  # resume.AtomicCheckpointIO's temporary checkpoint files
_TMP_DIR_MARKERS = (".tmp-", ".old-")  # atomic_directory's temporary and replaced directories


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed checkpoint writes and exports left in `folder`; returns what was removed. Call only while
    holding the folder's lock (a live run's temporaries look the same)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.is_file() and p.suffix == ".tmp":
            p.unlink(missing_ok=True)
            removed.append(p)
        elif p.name.startswith(".") and p.is_dir() and any(m in p.name for m in _TMP_DIR_MARKERS):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------ one run a directory


def run_directories(trainer) -> list[Path]:
    """The directories a fit writes into (outermost only): the checkpoint directories, and `default_root_dir` when a
    logger or a checkpoint callback writes in it (or below it). A run that writes nothing (no logger, no
    checkpoints) locks nothing, so two such runs from one working directory do not exclude each other."""
    root = Path(trainer.default_root_dir).resolve()
    dirs = [Path(cb.dirpath).resolve() for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    writes_root = bool(trainer.loggers) or any(isinstance(cb, ModelCheckpoint) and not cb.dirpath
                                               for cb in trainer.checkpoint_callbacks)
    if writes_root or any(root in d.parents for d in dirs):
        dirs.append(root)
    resolved = sorted(set(dirs), key=lambda d: len(d.parts))
    outer: list[Path] = []
    for d in resolved:
        if not any(d == o or o in d.parents for o in outer):
            outer.append(d)
    return outer


class RunLock(L.Callback):
    """Refuses a second fit into a directory another live run is using; see the module docstring."""

    def __init__(self):
        self._held: list[tuple[Path, int]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        refusal = self._acquire(trainer) if trainer.is_global_zero else None
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal:
            raise ConfigError(refusal)

    def _acquire(self, trainer) -> str | None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500]}
        for folder in run_directories(trainer):
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_holder(fd)
                os.close(fd)
                self.release()
                return (f"{folder} is in use by another run ({holder}); wait for it to finish, or give this run its "
                        "own directory (trainer.default_root_dir and the checkpoint dirpath)")
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
            self._held.append((folder, fd))
            removed = remove_stale_temporaries(folder)
            for cb in trainer.checkpoint_callbacks:
                if isinstance(cb, ModelCheckpoint) and cb.dirpath and Path(cb.dirpath).resolve() != folder:
                    removed += remove_stale_temporaries(cb.dirpath)
            if removed:
                rank_zero_info(f"removed {len(removed)} temporary files left by killed writes in {folder}")
        return None

    def release(self) -> None:
        for _, fd in self._held:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        self._held = []

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
        return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: {info.get('command')}"
    except (OSError, ValueError):
        return "a process holding its lock"


# ------------------------------------------------------------------------------------------------ preemption


class Preempted(SystemExit):
    """Raised (and so the process exits) after a preemption signal, once the checkpoint is written."""

    def __init__(self, signum: int, path: str | None):
        name = signal.Signals(signum).name
        where = f"checkpoint written to {path}" if path else "no checkpoint directory to write to"
        super().__init__(128 + signum)
        self.signum, self.path = signum, path
        self.message = (f"preempted by {name}: {where}; resume with `fit ... --ckpt_path last` "
                        f"(exit code {128 + signum})")

    def __str__(self) -> str:
        return self.message


def _slurm_requeue() -> None:
    """Under SLURM, put the job back in the queue (what SLURM's `--signal=USR1@...` warning is for), as Lightning's
    own SLURM handler does; the requeued job resumes with `--ckpt_path last`."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return
    import subprocess

    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        rank_zero_info(f"scontrol requeue {job}: " + ("done" if result.returncode == 0 else result.stderr.strip()))
    except (OSError, subprocess.TimeoutExpired) as e:
        rank_zero_warn(f"could not requeue SLURM job {job}: {e}")


def last_checkpoint_path(trainer) -> str | None:
    """Where `--ckpt_path last` looks: `last.ckpt` in the first ModelCheckpoint's directory."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return os.path.join(cb.dirpath, cb.CHECKPOINT_NAME_LAST + cb.FILE_EXTENSION)
    return None


class Preemption(L.Callback):
    """Checkpoint and exit non-zero on a preemption signal, at the next optimizer-step boundary."""

    def __init__(self, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")):
        """
        Args:
            signals: signal names that mean "save and stop" (SIGUSR1: SLURM's `--signal` default).
        """
        self.signals = tuple(signals)
        self._received: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self._received is None:
            self._received = signum
            print(f"[lit_ft] received {signal.Signals(signum).name}: finishing the current optimizer step, then "
                  "writing a checkpoint", file=sys.stderr, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        # After Lightning registered its own handlers (which would stop mid-accumulation and exit with code 0).
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handler)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.automatic_optimization:
            boundary = ((batch_idx + 1) % trainer.accumulate_grad_batches == 0
                        or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
            if not boundary:
                return
        received = self._received is not None
        if trainer.world_size > 1:  # every rank stops at the same step, whichever ones got the signal
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received:
            return
        signum = self._received or signal.SIGTERM
        path = last_checkpoint_path(trainer)
        if path is not None:
            trainer.save_checkpoint(path)
        else:
            rank_zero_warn("preempted, but the Trainer has no ModelCheckpoint directory: nothing was saved")
        if signum == getattr(signal, "SIGUSR1", None) and trainer.is_global_zero:
            _slurm_requeue()
        error = Preempted(signum, path)
        rank_zero_info(error.message)
        self._restore()
        raise error

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._restore()


def configure_callbacks(module: L.LightningModule) -> list[L.Callback]:
    """What every lit_ft module adds to its Trainer (`configure_callbacks = runs.configure_callbacks`): exact resume
    (`resume.configure_callbacks`), the resume rules for changed settings, one run a directory, preemption, and no
    run that trains nothing (`guards.TrainsSomething`). A
    callback of the same type already on the Trainer (configured by the user) is kept instead."""
    from lit_ft.train import resume
    from lit_ft.train.checkpointing import ResumeSettings
    from lit_ft.train.guards import TrainsSomething

    trainer = getattr(module, "_trainer", None)
    present = {type(cb) for cb in (trainer.callbacks if trainer is not None else [])}
    wanted = [TrainsSomething(), *resume.configure_callbacks(module), ResumeSettings(), RunLock(), Preemption()]
    return [cb for cb in wanted if type(cb) not in present]
