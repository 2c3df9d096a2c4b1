"""Integrity of what a run writes and reads: checkpoint digests and finite trainable state.

torch's checkpoint archive is a zip whose CRCs torch does not check on load, so bytes flipped inside tensor data
load silently. Every lit_ft checkpoint therefore carries a SHA-256 digest of its contents (`seal`, called last in
every module's `on_save_checkpoint`), checked by `verify` wherever a checkpoint is read (the checkpoint IO plugin,
the modules' `on_load_checkpoint`, the export command). `newest_verified` finds the newest checkpoint of a
directory that passes, for the error message and for `last`'s fall-back (`resume.AtomicCheckpointIO`). The base
model's identity (its weights' fingerprint) is `lit_ft.models.identity`.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from lit_ft.errors import ConfigError, LitFTError, refused_pickle

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
            raise ConfigError(refused_pickle(path, e)) from None
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


def all_finite(tensors) -> torch.Tensor | None:
    """A 0-d bool tensor, True when every element of every tensor is finite; None for no tensors. No device sync.

    One multi-tensor L2 norm per device and dtype (`torch._foreach_norm`, as `clip_grad_norm_` uses: a few kernel
    launches instead of two per tensor), then one check of the norms: NaN and inf propagate into a norm. A finite
    tensor whose norm overflows float32 (above about 1.8e19) counts as not finite too.
    """
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t.detach())
    if not groups:
        return None
    checks = [torch.stack(torch._foreach_norm(ts)).isfinite().all() for ts in groups.values()]
    return checks[0] if len(checks) == 1 else torch.stack([c.to(checks[0].device) for c in checks]).all()


def trainable_finite(params) -> bool:
    """True when every given parameter is finite (one device sync for all of them)."""
    ok = all_finite(params)
    return True if ok is None else bool(ok)
