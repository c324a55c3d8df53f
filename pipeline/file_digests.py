"""Content digests of input files, remembered by path, size and mtime.

Hashing the four MNIST files costs about 0.2 s, on every cache lookup; a file whose size and
mtime are unchanged is taken to have the same content, so its digest is read from a small
JSON memo instead. An edited, replaced or `touch`ed file is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_ENV = "PIPELINE_CACHE_DIR"


def cache_root() -> Path:
    """This pipeline's folder for what it keeps on this machine between runs."""
    root = os.environ.get(CACHE_ENV) or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "mnist-mlp-pipeline"
    return Path(root)


def memo_path() -> Path:
    return cache_root() / "file_digests.json"


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(path: Path, memo: dict) -> None:
    """Atomic, and best effort: a read-only home only costs the next lookup a re-hash."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(memo, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass


def file_digest(path: str | Path) -> str | None:
    """sha256 of the file's content, or None when there is no such file."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    memo_file = memo_path()
    memo = _read_memo(memo_file)
    stamp = [stat.st_size, stat.st_mtime_ns]
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    memo[str(path)] = {"stamp": stamp, "sha256": digest}
    _write_memo(memo_file, memo)
    return digest
