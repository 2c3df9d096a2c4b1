"""Errors the user can act on. Each names where the problem is (file, line, field) or the setting to change."""

from __future__ import annotations


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
