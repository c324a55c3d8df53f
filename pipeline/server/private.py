"""Folders and files only their owner can read, from the moment they exist.

A chmod after writing leaves a window in which another local user can open the file (and keep
the open descriptor), so secrets are created with their final mode instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def private_folder(path: Path, group: str | None = None) -> Path:
    """`path` (made if missing) at mode 0700; with `group`, 0710 and that group, so that the
    group's user (PostgreSQL's, which runs a cluster inside) can pass through it but not list
    it. An existing folder is narrowed to the same mode."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if group is not None:
        shutil.chown(path, group=group)
        os.chmod(path, 0o710)
    return path


def write_private(path: Path, text: str) -> None:
    """Create `path` holding `text` at mode 0600 from the start (a file already there, which may
    be wider, is replaced; a link there is not followed)."""
    Path(path).unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def open_private_log(path: Path):
    """`path` opened for appending, created at 0600 (an existing one is narrowed to it)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(descriptor, 0o600)
    return os.fdopen(descriptor, "ab")
