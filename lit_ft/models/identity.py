"""The base model's identity: where its weights are, a fingerprint of what they hold, and the record an exported
adapter keeps of the base it was trained on (`lit_ft_base.json`), checked wherever an adapter meets a base.

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
from collections.abc import Mapping
from pathlib import Path

from lit_ft.models.default import default_model_dir

_MB = 1 << 20


def local_weights_path(name_or_path: str | None, revision: str | None = None) -> str | None:
    """The local file or directory holding a base's weights: the bundled default's cache, a `.gguf` file, a local
    directory, or a hub id's snapshot in the local cache (None when it is not there; nothing is downloaded)."""
    if name_or_path is None:
        return default_model_dir()
    p = Path(name_or_path).expanduser()
    if p.exists():
        return str(p)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: no fingerprint
        return None


def saved_tensor(where: str | os.PathLike | None, key: str):
    """The tensor `key` from the safetensors files of the model directory `where`, read alone (None when `where` is
    no directory or no file holds it)."""
    if where is None or not Path(where).is_dir():
        return None
    from safetensors import safe_open

    for f in sorted(Path(where).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            if key in handle.keys():
                return handle.get_tensor(key)
    return None


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
