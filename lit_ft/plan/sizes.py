"""Byte sizes as the plan prints them and as users write budgets."""

from __future__ import annotations

import re

from lit_ft.errors import ConfigError


def fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'24GiB', '24GB', '80 GiB', '1.5e9' -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--budget={text!r}: expected a size such as 24GiB, 24GB or 80000MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def ordinal(k: int) -> str:
    """2 -> '2nd', 4 -> '4th' (the k of checkpointing every k-th layer)."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"
