"""Integrity of what a run writes and reads: checkpoint digests, finite trainable state, base-weight fingerprints.

torch's checkpoint archive is a zip whose CRCs torch does not check on load, so bytes flipped inside tensor data
load silently. Every lit_ft checkpoint therefore carries a SHA-256 digest of its contents (`seal`, called last in
every module's `on_save_checkpoint`), checked by `verify` wherever a checkpoint is read (the checkpoint IO plugin,
the modules' `on_load_checkpoint`, the export command). `newest_verified` finds the newest checkpoint of a
directory that passes, for the error message and for `last`'s fall-back (`resume.AtomicCheckpointIO`).

`weights_fingerprint` identifies the frozen base by what it holds, not by its path: the config plus, per weight
file, its size and its first and last megabyte (a safetensors header, which lists every tensor's dtype, shape and
offset, is at the start). Reading 2 MB a file keeps it cheap for a 70B model while any re-download, conversion or
fine-tune of the weights at the same path changes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from lit_ft.errors import LitFTError

DIGEST_KEY = "lit_ft_digest"
STATS_KEYS = "lit_ft_statistics"  # state_dict entries that are statistics, not weights (NaN may mean "not yet seen")
_MB = 1 << 20


class CheckpointError(LitFTError, ValueError):
    """A checkpoint that is truncated, corrupted or holds non-finite weights."""


# ------------------------------------------------------------------------------------------- checkpoint digest


def _update(h, key: str, value) -> None:
    """Feed one value into the hash in a traversal that does not depend on dict order or container types."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|T|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(value, Mapping):
        h.update(f"{key}|M{len(value)}|".encode())
        for k in sorted(value, key=str):
            _update(h, f"{key}/{k}", value[k])
    elif isinstance(value, (list, tuple)):
        h.update(f"{key}|L{len(value)}|".encode())
        for i, v in enumerate(value):
            _update(h, f"{key}/{i}", v)
    elif value is None or isinstance(value, (bool, int, float, str, bytes)):
        h.update(f"{key}|{type(value).__name__}|{value!r}|".encode())
    else:  # nothing else loads with weights_only=True; keep the type so a swap is still noticed
        h.update(f"{key}|{type(value).__name__}|".encode())


def digest(checkpoint: Mapping) -> str:
    """SHA-256 over every entry of a checkpoint dict except the digest itself (tensors by their bytes)."""
    h = hashlib.sha256()
    for k in sorted(checkpoint, key=str):
        if k != DIGEST_KEY:
            _update(h, str(k), checkpoint[k])
    return h.hexdigest()


def seal(checkpoint: dict) -> None:
    """Record the digest of the checkpoint's contents; call after everything else has been written into it."""
    checkpoint[DIGEST_KEY] = digest(checkpoint)


def non_finite_tensors(state: Mapping) -> list[str]:
    """Names of floating tensors in `state` holding a NaN or an inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def verify(checkpoint: Mapping, path: str | os.PathLike | None = None) -> None:
    """Raise CheckpointError when a sealed checkpoint's contents changed or its trainable state is not finite.

    Checkpoints written before digests existed (no `lit_ft_digest` entry) pass the digest check.
    """
    where = str(path) if path is not None else "the checkpoint"
    saved = checkpoint.get(DIGEST_KEY)
    if saved is not None and saved != digest(checkpoint):
        raise CheckpointError(f"{where}: corrupted: its contents do not match the digest recorded when it was "
                              f"written{_newest_hint(path)}")
    statistics = set(checkpoint.get(STATS_KEYS) or ())
    bad = [k for k in non_finite_tensors(checkpoint.get("state_dict") or {}) if k not in statistics]
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} trainable tensors hold NaN/inf (first: {bad[0]}){_newest_hint(path)}")


def load_verified(path: str | os.PathLike) -> dict:
    """`torch.load(weights_only=True)` + `verify`; a file that does not load at all (truncated, not a checkpoint)
    is a CheckpointError naming it and the newest checkpoint beside it that verifies."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise  # a checkpoint holding pickled objects: the caller explains that case
        raise CheckpointError(f"{path}: unreadable checkpoint ({str(e).strip()[:160]}){_newest_hint(path)}") from e
    except Exception as e:  # truncated zip, wrong file type: torch raises many kinds
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: unreadable checkpoint (truncated or not a checkpoint: {first})"
                              f"{_newest_hint(path)}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}){_newest_hint(path)}")
    verify(state, path)
    return state


def newest_verified(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> Path | None:
    """The most recently written `*.ckpt` in `folder` (other than `exclude`) that loads and verifies."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    skip = Path(exclude).resolve() if exclude is not None else None
    candidates = sorted((p for p in folder.glob("*.ckpt") if p.is_file() and p.resolve() != skip),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
            if isinstance(state, dict):
                verify(state)
                return p
        except Exception:
            continue
    return None


def _newest_hint(path) -> str:
    if path is None:
        return ""
    good = newest_verified(Path(path).parent, exclude=path)
    return (f"; the newest checkpoint that verifies is {good} (pass it as --ckpt_path)" if good
            else "; no other checkpoint in that directory verifies")


# ------------------------------------------------------------------------------------------- trainable state


def trainable_finite(params) -> bool:
    """True when every given parameter is finite (one device sync for all of them)."""
    checks = [torch.isfinite(p.detach()).all() for p in params]
    return bool(torch.stack(checks).all()) if checks else True


# ------------------------------------------------------------------------------------------- base weights

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


_CONFIG_VOLATILE = ("transformers_version", "_name_or_path")
"""config.json keys that say who wrote the file, not what the weights are: the same base converted or saved by
another transformers release must fingerprint the same (an adapter moves between machines)."""


def _config_identity(path: Path) -> bytes:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return path.read_bytes()
    if not isinstance(config, dict):
        return path.read_bytes()
    return json.dumps({k: v for k, v in config.items() if k not in _CONFIG_VOLATILE}, sort_keys=True).encode()


@functools.lru_cache(maxsize=32)
def _fingerprint(path: str, mtimes: tuple, legacy: bool = False) -> str | None:
    """`legacy`: the digest lit_ft wrote before 2026-12-02, over config.json's raw bytes (its
    `transformers_version` included), so adapters and checkpoints written then are still recognised."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file()
                                                  and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        return None
    h = hashlib.sha256()
    for p in files:
        if p.name == "config.json" and not legacy:
            h.update(b"config.json|" + _config_identity(p))
            continue
        size = p.stat().st_size
        h.update(f"{p.name}|{size}|".encode())
        with open(p, "rb") as f:
            h.update(f.read(_MB))
            if size > 2 * _MB:
                f.seek(size - _MB)
                h.update(f.read(_MB))
    return h.hexdigest()[:16]


def weights_fingerprint(path: str | os.PathLike | None) -> str | None:
    """Short digest of a local model directory or `.gguf` file (see the module docstring); None when `path` is not
    a local directory or file holding weights (a hub id not in the local cache, for example)."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None
    entries = [p] if p.is_file() else list(p.iterdir())
    mtimes = tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries if e.is_file()))
    digest = _fingerprint(str(p.resolve()), mtimes)
    if digest is not None:
        _LEGACY[digest] = _fingerprint(str(p.resolve()), mtimes, legacy=True)
    return digest


_LEGACY: dict[str, str | None] = {}
"""This process's fingerprints -> the same weights' legacy digest (`_fingerprint(..., legacy=True)`)."""


def _same_weights(saved: str, current: str) -> bool:
    return saved == current or (current in _LEGACY and saved == _LEGACY[current])


def describe_identity(identity: Mapping) -> str:
    return json.dumps(dict(identity), sort_keys=True)


# ------------------------------------------------------------------------------------------- base identity

BASE_FILE = "lit_ft_base.json"  # in every exported adapter directory: the base it was trained on


def read_base_identity(adapter_dir) -> dict | None:
    f = Path(adapter_dir) / BASE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def identity_diff(saved: Mapping, current: Mapping, keys=None) -> dict:
    """The identity entries (of `keys`, default all) that both sides record and that differ. An entry one side
    lacks (a checkpoint from before fingerprints, a hub id not in the local cache) is not compared."""
    keys = keys if keys is not None else current.keys()
    def differ(k) -> bool:
        a, b = saved.get(k), current.get(k)
        if a is None or b is None:
            return False
        return not _same_weights(a, b) if k == "weights" else a != b

    return {k: (saved.get(k), current.get(k)) for k in keys if differ(k)}


def check_adapter_base(adapter_dir, identity: Mapping, setting: str) -> None:
    """Refuse an adapter exported from another base's weights. Only the weights are compared: the same weights
    under another path, or quantized differently (an adapter trained in bf16 applied to an NF4 base), are fine."""
    saved = read_base_identity(adapter_dir)
    if saved and identity_diff(saved, identity, keys=("weights",)):
        from lit_ft.errors import ConfigError

        raise ConfigError(f"{setting}: {adapter_dir} was trained on other base weights than this run's "
                          f"(adapter: {describe_identity(saved)}; this run: {describe_identity(identity)})")
