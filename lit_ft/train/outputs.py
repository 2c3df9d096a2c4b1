"""Writing a command's outputs without destroying anything: the target checked before any work (`check_output`)
and written atomically with the user's umask (`atomic_directory`). Standard library only, so a command refuses a
bad output path in a fraction of a second, before torch is imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from lit_ft.errors import ConfigError


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary directory beside `path`; on success it replaces `path` (rename), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = current_umask()
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would keep the export from other users once renamed
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for written in tmp.rglob("*"):  # writers that go through a temporary file leave 0600, whatever the umask
        if written.is_file():
            os.chmod(written, 0o666 & ~umask)
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(out: str | os.PathLike, setting: str, inputs: tuple = (), overwrite: bool = False,
                 kind: str = "directory") -> Path:
    """A command's output path, refused before any work when writing it would destroy something: an existing file
    where a directory goes (or the reverse), an existing non-empty target unless `overwrite`, or a path that is, holds
    or lies inside one of the command's `inputs` (never, whatever `overwrite` says)."""
    out = Path(out)
    target = out.resolve()
    for source in (Path(p).resolve() for p in inputs if p is not None):
        if target == source or source in target.parents or target in source.parents:
            raise ConfigError(f"{setting} {out}: it is (or holds, or lies inside) the input {source}; write "
                              "somewhere else")
    if out.exists():
        if kind == "directory" and not out.is_dir():
            raise ConfigError(f"{setting} {out}: an existing file, not a directory; name a directory")
        if kind == "file" and out.is_dir():
            raise ConfigError(f"{setting} {out}: an existing directory, not a file; name a file")
        if not overwrite and (out.is_file() or any(out.iterdir())):
            raise ConfigError(f"{setting} {out}: already exists and is not empty; name a new path, or add "
                              "--overwrite to replace it")
    return out
