"""Exact resume and safe checkpoints: a stateful seeded training loader, RNG state in checkpoints, atomic writes.

Lightning restores weights, optimizer, scheduler and loop counters, but not the random number generators, and a
plain DataLoader restarts its epoch from the first batch after a mid-epoch resume (the resumed run sees other
batches than the uninterrupted one would have). The three pieces here close that gap, so that killing a run and
running `fit --ckpt_path last` gives the same per-step losses and adapter weights as never stopping (bit for bit
on CPU with a fixed seed):

- `ResumableDataLoader`: the datamodules' training loader (`lit_ft.data.modules.make_loader`). Its order is a
  permutation seeded by `seed + epoch` (the `DistributedSampler` recipe, so every rank agrees on it) and its
  `state_dict()` records the epoch and how far into that order the consumed batches reach. Lightning saves and
  loads it with the fit loop (it checks for the `state_dict`/`load_state_dict` protocol); `ResumeLoaderState`
  applies it where Lightning would drop it (a run whose length is set in epochs).
- `ResumeRNG`: a callback that stores the torch (CPU and CUDA), numpy and Python RNG states of every rank in the
  checkpoint and puts them back just before the first training batch after a resume. The lit_ft modules add it
  and `ResumeLoaderState` themselves (`configure_callbacks = resume.configure_callbacks`, one line in the class
  body).
- `AtomicCheckpointIO`: writes each checkpoint to a temporary file in the same directory, fsyncs it and renames it
  over the final name, so a crash during a save leaves the previous checkpoint intact; it loads with
  `weights_only=True` (lit_ft checkpoints hold tensors and plain values only). Pass it as `Trainer(plugins=[...])`.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lit_ft.train import integrity
from lit_ft.errors import ConfigError
from lit_ft.train.outputs import current_umask

# ------------------------------------------------------------------------------------------------ data order


def _world() -> tuple[int, int]:
    """(world size, rank) of the initialized process group; (1, 0) outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """`DistributedSampler`'s seeded, epoch-dependent order, which can start part-way into an epoch.

    `start` is a position in the *global* order (all ranks together): rank r takes every world-size-th index
    of what remains. The position therefore survives a change of world size, and Lightning keeps this sampler
    instead of wrapping it (it is already a DistributedSampler).
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False, lengths: list[int] | None = None, group_size: int = 0):
        """`lengths` and `group_size`: length-grouped order (`group_by_length`), see `global_order`."""
        world, me = _world()
        super().__init__(dataset, num_replicas=num_replicas or world, rank=me if rank is None else rank,
                         shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0
        self.lengths, self.group_size = lengths, group_size

    def global_order(self) -> list[int]:
        """This epoch's order over all ranks, padded (or cut, with drop_last) to `total_size`."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        if self.lengths is not None and self.group_size > 1:
            # Length grouping (transformers' LengthGroupedSampler): the shuffled order cut into mega-batches, each
            # sorted longest first, so a batch holds rows of similar length (less padding) while the mega-batches
            # stay in random order. A function of (seed, epoch) only, so a resumed epoch has the same order.
            k = self.group_size
            order = [i for a in range(0, n, k) for i in sorted(order[a:a + k], key=lambda i: -self.lengths[i])]
        if len(order) < self.total_size:
            order += (order * (self.total_size // max(n, 1) + 1))[: self.total_size - len(order)]
        return order[: self.total_size]

    def __iter__(self):
        rest, self.start = self.global_order()[self.start :], 0
        if rest and len(rest) % self.num_replicas:  # after a world-size change: keep ranks in step
            rest += rest[: self.num_replicas - len(rest) % self.num_replicas]
        return iter(rest[self.rank :: self.num_replicas])

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a new epoch starts at its beginning
        super().set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    """A shuffling training DataLoader whose position can be saved and restored mid-epoch.

    `state_dict()` = `{"epoch", "position", "seed", "size"}`, where `position` counts the samples (over all
    ranks) of the batches this loader has *returned*. Worker prefetching does not count; Lightning's own
    fetcher does not prefetch from a loader that has a length. `load_state_dict()` makes the next iteration
    continue from there (Lightning calls `set_epoch` afterwards: the same epoch keeps the position, the next
    epoch starts afresh).
    """

    def __init__(self, dataset, batch_size: int = 1, shuffle: bool = True, seed: int = 0, collate_fn=None,
                 num_workers: int = 0, drop_last: bool = False, lengths: list[int] | None = None,
                 megabatch: int = 50):
        """`lengths` (one per row) turns on length-grouped batches: mega-batches of `megabatch` batches (of every
        rank together) sorted by length; 50 as in transformers' `group_by_length`."""
        world, _ = _world()
        sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, lengths=lengths,
                                   group_size=batch_size * world * megabatch if lengths is not None else 0)
        # A private generator: creating an iterator draws a base seed, which must not come from (and so shift)
        # the global torch RNG that LoRA dropout uses.
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,
                         num_workers=num_workers, persistent_workers=num_workers > 0, drop_last=drop_last,
                         generator=torch.Generator().manual_seed(seed))
        self._epoch, self._position = 0, 0
        self._digest: str | None = None

    @property
    def digest(self) -> str | None:
        """Content digest of the training rows (`dataset_digest`), computed once."""
        if self._digest is None:
            self._digest = dataset_digest(self.dataset)
        return self._digest

    def __iter__(self):
        # A generator: nothing runs until the first batch is asked for, after Lightning's `set_epoch`.
        sampler = self.sampler
        self._epoch, self._position = sampler.epoch, sampler.start
        step = self.batch_size * sampler.num_replicas
        for batch in super().__iter__():
            self._position = min(self._position + step, sampler.total_size)
            yield batch

    def state_dict(self) -> dict[str, int | str | None]:
        return {"epoch": self._epoch, "position": self._position, "seed": self.sampler.seed,
                "size": len(self.dataset), "digest": self.digest, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("digest") and self.digest and state["digest"] not in (self.digest,
                                                                           dataset_digest(self.dataset, legacy=True)):
            raise ConfigError(
                f"data.train_file: the training data changed since the checkpoint (content digest "
                f"{state['digest'][:12]} -> {self.digest[:12]}, rows {state.get('size')} -> {len(self.dataset)}): "
                "its saved position would point into other rows. Restore the data the run was started with, or "
                "start a new run from the exported adapter (model.base.adapter)"
            )
        if state.get("batch_size") is not None and state["batch_size"] != self.batch_size:
            rank_zero_info(f"resume: data.batch_size changed since the checkpoint ({state['batch_size']} -> "
                           f"{self.batch_size}); the epoch continues from the same sample")
        if state.get("seed") != self.sampler.seed or state.get("size") != len(self.dataset):
            rank_zero_warn(
                f"the training data or its seed changed since the checkpoint (size {state.get('size')} -> "
                f"{len(self.dataset)}, seed {state.get('seed')} -> {self.sampler.seed}): the resumed epoch's order "
                "differs from the interrupted one"
            )
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.start = min(int(state["position"]), self.sampler.total_size)
        self._epoch, self._position = int(state["epoch"]), self.sampler.start


def dataset_digest(dataset, legacy: bool = False) -> str | None:
    """SHA-256 of a `datasets.Dataset`'s rows in their order (its Arrow IPC stream, selections applied), so a resume
    notices edited or reordered data, not only a changed row count; None for other dataset types.

    The schema's metadata is left out: `datasets` writes its cache fingerprint there, which changes with the
    environment (`HF_HUB_OFFLINE`, library versions) for the same rows. `legacy`: the digest written before
    2026-12-06, metadata included (what checkpoints of then hold)."""
    if not hasattr(dataset, "with_format") or not hasattr(dataset, "column_names"):
        return None
    import hashlib

    import pyarrow as pa

    table = dataset.with_format("arrow")[:] if len(dataset) else None
    if table is None:
        return hashlib.sha256(b"").hexdigest()
    if not legacy:
        table = table.replace_schema_metadata(None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(memoryview(sink.getvalue())).hexdigest()


# ------------------------------------------------------------------------------------------------ RNG state


def capture_rng() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), numpy and Python RNG states, as tensors and plain values."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class ResumeRNG(L.Callback):
    """Saves every rank's RNG states in the checkpoint and restores them before the first batch after a resume.

    Restoring at `on_train_batch_start` rather than at load time keeps anything that runs in between (sanity
    validation, `on_train_start` callbacks, building iterators) from shifting the streams. Saving gathers the
    states of all ranks (checkpoints are dumped on every rank); each rank gets its own back.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        local = capture_rng()
        world, _ = _world()
        states = [local]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, local)
        return {"ranks": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["ranks"]
        world, rank = _world()
        if len(states) != world:
            rank_zero_warn(f"the checkpoint holds RNG states of {len(states)} processes, this run has {world}: "
                           "dropout and sampling will not repeat the interrupted run exactly")
        self._pending = states[rank] if rank < len(states) else states[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            restore_rng(self._pending)
            self._pending = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._pending = None


class ResumeLoaderState(L.Callback):
    """Applies the checkpointed position of the training loader where Lightning would drop it.

    Lightning hands a loader its saved `state_dict` only while it builds the training loader after the
    checkpoint's loop state was read. `optim.configure` asks `trainer.estimated_stepping_batches`, which builds the
    loader earlier, during `strategy.setup`, whenever the run length is set in epochs (`max_epochs`: the PPO recipe,
    and any SFT or reward run without `max_steps`); the saved position then stays pending and a mid-epoch resume
    starts its epoch again from the first batch (Lightning issue #20550). At `on_train_start` (after the restore,
    before the first batch is fetched) this loads the pending states and recreates the fetcher's iterator, as
    Lightning's own path does. A no-op when Lightning already loaded them.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        loop = trainer.fit_loop
        if not getattr(loop, "_combined_loader_states_to_load", None):
            return
        loop._load_combined_loader_states()
        if getattr(loop, "_data_fetcher", None) is not None:
            iter(loop._data_fetcher)


def configure_callbacks(module: L.LightningModule) -> list[L.Callback]:
    """A LightningModule opts into exact resume with `configure_callbacks = resume.configure_callbacks`.

    Lightning adds these to the Trainer's callbacks (replacing one of the same type), with or without the CLI.
    """
    return [ResumeRNG(), ResumeLoaderState()]


# ------------------------------------------------------------------------------------------------ atomic files


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically (temp file, fsync, rename) and loaded with `weights_only=True`.

    A crash while saving leaves at most a stray `.tmp` file; the final name (`last.ckpt` included) always holds a
    complete checkpoint. Remote paths (`s3://`, ...) use Lightning's own transactional writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = path.removeprefix("file://")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would ignore the user's umask
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _fsync_dir(folder)

    def __init__(self, fallback_to_verified: bool = True):
        """
        Args:
            fallback_to_verified: when a `last*.ckpt` (what `--ckpt_path last` picks) fails its digest or does not
                load, resume from the newest checkpoint beside it that verifies, saying so. Any other path is refused.
        """
        super().__init__()
        self.fallback_to_verified = fallback_to_verified

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only: bool | None = None):
        """Load with `weights_only=True` and verify the digest (`lit_ft.train.integrity`): a truncated or corrupted file is
        refused with a message naming it and the newest checkpoint beside it that verifies."""
        if weights_only is False or "://" in str(path) and not str(path).startswith("file://"):
            return super().load_checkpoint(path, map_location, weights_only=weights_only)
        path = str(path).removeprefix("file://")
        try:
            return integrity.load_verified(path)
        except integrity.CheckpointError as e:
            if not (self.fallback_to_verified and os.path.basename(path).startswith("last")):
                raise
            good = integrity.newest_verified(os.path.dirname(os.path.abspath(path)), exclude=path)
            if good is None:
                raise
            rank_zero_warn(f"{e}. Resuming from {good} instead.")
            return integrity.load_verified(good)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
