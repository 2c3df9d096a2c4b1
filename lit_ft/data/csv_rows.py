"""CSV files as rows of text cells, each with the line it starts on (the header is line 1)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from lit_ft.errors import DataError


COMPRESSED = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
              b"PK\x03\x04": "zip"}


def text_bytes(path: Path) -> bytes:
    """The bytes of a text data file (JSON, JSON Lines, CSV), refused with the real reason where they cannot be text
    rows: a compressed file under a text name, or old-Mac CR-only line endings (one endless line to a reader)."""
    data = path.read_bytes()
    for magic, kind in COMPRESSED.items():
        if data.startswith(magic):
            raise DataError(f"the file is {kind}-compressed, not text: decompress it first", file=str(path))
    if b"\r" in data and b"\n" not in data:
        raise DataError("the lines end in a bare carriage return (CR, old Mac style); convert them to \\n (or "
                        "\\r\\n) line endings", file=str(path))
    return data


def read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """CSV rows as text, with the source line where each row starts (line 1 is the header).

    Read with the ``csv`` module rather than pandas: every cell stays text (pandas would turn an answer "42"
    into an int and fail the string check), multi-line quoted cells keep true line numbers, a UTF-8 BOM is
    accepted, and bad bytes are reported by line. An empty cell is a missing value (None). Columns with an
    empty header (a trailing comma, an unnamed index column) are ignored; a row with more cells than the
    header has columns is an error.
    """
    data = text_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                        file=str(path), line=data.count(b"\n", 0, e.start) + 1) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        twice = sorted({k for k in header if k.strip() and header.count(k) > 1})
        if twice:  # a dict keeps the last of two same-named cells: which one is meant?
            raise DataError(f"the header names {twice} more than once", file=str(path), line=1)
        rows, lines, start = [], [], reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) > len(header):
                    raise DataError(f"{len(cells)} cells but the header has {len(header)} columns",
                                    file=str(path), line=start)
                _check_swallowed(cells, header, path, start)
                rows.append({k: (c if c != "" else None) for k, c in zip(header, cells) if k.strip()}
                            | {k: None for k in header[len(cells):] if k.strip()})
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"invalid CSV: {e}", file=str(path), line=reader.line_num) from None
    if not rows and any(k.strip() for k in header):
        raise DataError("no rows: the file has a header but no data rows", file=str(path))
    return rows, lines


def _check_swallowed(cells: list[str], header: list[str], path: Path, line: int) -> None:
    """A quoted cell that spans lines which each read as a whole row of this file is an unbalanced quote that
    swallowed the rows after it (the `csv` module reads on to the next quote): an error naming where it starts,
    never rows silently merged into one."""
    for name, cell in zip(header, cells):
        inner = cell.split("\n")[1:]
        if len(inner) < 2:
            continue
        rowlike = [i for i, text in enumerate(inner, 1)
                   if len(cells_of := next(csv.reader([text]), [])) == len(header) and all(c.strip() for c in cells_of)]
        if len(rowlike) >= 2:
            raise DataError(f"a quoted cell runs over {len(inner)} more lines, {len(rowlike)} of which read as rows of "
                            "this file: an unbalanced quote (a '\"' that is never closed) swallowed them; escape a "
                            "quote inside a cell as \"\"", file=str(path), line=line, field=name)
