"""Errors the user can act on. Each names where the problem is (file, line, field) or the setting to change."""

from __future__ import annotations

import contextlib
from pathlib import Path


class LitFTError(Exception):
    """Base class of every error lit_ft raises on purpose."""


class DataError(LitFTError, ValueError):
    """A bad input row or file.

    The message reads ``<file>:<line>: field '<field>': <what was expected>`` so it can be pasted into an
    editor's go-to-line; ``line`` is 1-based (for CSV the header is line 1, for Parquet/hub data it is the row
    number).
    """

    def __init__(self, message: str, file: str | None = None, line: int | None = None, field: str | None = None):
        self.file, self.line, self.field, self.reason = file, line, field, message
        where = file or "<data>"
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {message}")


class ConfigError(LitFTError, ValueError):
    """A setting that cannot work; the message names the setting and what to change."""


def refused_pickle(path, error: BaseException) -> str:
    """The one line for a file that holds pickled Python objects: loading one can run any code, so it is not."""
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return (f"{path}: refused: the file holds pickled Python objects, which lit_ft never loads (loading one can run "
            f"any code; {first}). Save it as tensors and plain values (safetensors, torch.save of a state dict), or "
            "load it yourself only if you trust its origin")


def pickle_cause(error: BaseException | None) -> BaseException | None:
    """The UnpicklingError of a `weights_only=True` refusal in `error`'s chain, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if type(error).__name__ == "UnpicklingError" and "weights only" in str(error).lower():
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


@contextlib.contextmanager
def loading(path, setting: str):
    """Around a load from `path` (a model or adapter directory a setting names): torch's refusal of a pickle
    (`weights_only=True`) and an adapter of another model's shapes become one ConfigError naming the setting and the
    file, instead of a traceback."""
    try:
        yield
    except LitFTError:
        raise
    except Exception as e:
        cause = pickle_cause(e)
        if cause is None and isinstance(e, RuntimeError) and "size mismatch" in str(e):
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), "")[:200]
            raise ConfigError(f"{setting}: {path} does not fit this base model: its tensors have other shapes "
                              f"({first}); it was trained on another model") from None
        if cause is None:
            raise
        files = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")) \
            if Path(path).is_dir() else []
        where = Path(path) / files[0] if len(files) == 1 else path
        raise ConfigError(f"{setting}: {refused_pickle(where, cause)}") from None
