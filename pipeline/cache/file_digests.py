"""Content digests of input files, remembered by the file's stat stamp; the stamp and the memo
files themselves, which code_digest.py uses too.

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


def read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def write_memo(path: Path, memo: dict) -> None:
    """Atomic, and best effort: a read-only home only costs the next lookup a re-hash."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(memo, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass


def stamp(stat: os.stat_result) -> list[int]:
    """What changes whenever a file's (or a folder's) content does: size, mtime, ctime, inode
    and device."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev]


def settled(stamp_: list[int]) -> bool:
    """Whether what carries this stamp last changed long enough ago for a memo to trust it
    (git's racy rule, above)."""
    return time.time_ns() - max(stamp_[1], stamp_[2]) > RACY_WINDOW_S * 1e9


def file_digest(path: str | Path) -> str | None:
    """sha256 of the file's content, or None when there is no such file."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    memo_file = memo_path()
    memo = read_memo(memo_file)
    stamped = stamp(stat)
    entry = memo.get(str(path))
    if isinstance(entry, dict) and entry.get("stamp") == stamped:
        return entry["sha256"]
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if settled(stamped):
        memo[str(path)] = {"stamp": stamped, "sha256": digest}
        write_memo(memo_file, memo)
    return digest
