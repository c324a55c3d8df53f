"""Content digests of input files, remembered by the file's stat stamp.

Hashing the four MNIST files costs about 0.2 s, on every cache lookup; a file whose stamp is
unchanged is taken to have the same content, so its digest is read from a small JSON memo
instead. The stamp is git's: size, mtime, ctime, inode and device. mtime alone is not enough
(`cp -p`, `rsync -t`, `os.utime` put an old one back on new content), but no program can set
ctime: any write or utime moves it. A file changed within RACY_WINDOW_S of being hashed could
change again within the same clock tick, so such an entry is not kept (git's "racy" rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

CACHE_ENV = "PIPELINE_CACHE_DIR"
# Timestamps advance in clock ticks of a few milliseconds; a second is ample.
RACY_WINDOW_S = 1.0


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
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    last_change_ns = max(stat.st_mtime_ns, stat.st_ctime_ns)
    if time.time_ns() - last_change_ns > RACY_WINDOW_S * 1e9:
        memo[str(path)] = {"stamp": stamp, "sha256": digest}
        _write_memo(memo_file, memo)
    return digest
