"""A stage's code version: the digest of its module and of every pipeline module it imports,
found by reading their source (nothing is imported, so keys cost no torch start-up), remembered
between processes while the package is untouched, and the cache key built on it."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from pathlib import Path

from pipeline.cache.file_digests import cache_root, read_memo, settled, stamp, write_memo

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = PACKAGE_ROOT.name


@functools.cache
def _pipeline_imports(module: str) -> frozenset[str]:
    """`module` and every pipeline module it imports, directly or through others, read from
    the source (nothing is imported, so keys cost no torch start-up)."""
    found = {module}
    pending = [module]
    while pending:
        name = pending.pop()
        tree = ast.parse(Path(_source_path(name)).read_bytes())
        for node in ast.walk(tree):
            for imported in _imported_modules(node, name):
                # A package's __init__ runs before any module inside it.
                parts = imported.split(".")
                for depth in range(1, len(parts) + 1):
                    candidate = ".".join(parts[:depth])
                    if candidate.split(".")[0] == PACKAGE and candidate not in found:
                        found.add(candidate)
                        pending.append(candidate)
    return frozenset(found)


def _imported_modules(node: ast.AST, importer: str) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = importer.rsplit(".", node.level)[0]
        base = f"{package}.{base}" if base else package
    # `from pipeline import plots` names a module; `from pipeline.core.data import SPLITS` does not.
    submodules = [f"{base}.{alias.name}" for alias in node.names
                  if _source_path(f"{base}.{alias.name}") is not None]
    return [base, *submodules]


@functools.cache
def _source_path(module: str) -> str | None:
    if module.split(".")[0] != PACKAGE:
        return None
    relative = Path(*module.split("."))
    for candidate in (relative.with_suffix(".py"), relative / "__init__.py"):
        if (PACKAGE_ROOT.parent / candidate).is_file():
            return str(PACKAGE_ROOT.parent / candidate)
    return None


def code_version(stage_module: str) -> str:
    """Digest of the code of a stage's module and of every pipeline module it imports.

    Derived, not listed by hand: a module the stage starts to use enters its key by itself.
    Taken over each module's syntax tree without docstrings, so comments, docstrings and
    formatting retrain nothing; any change to what the code does changes the key.

    Parsing the package costs a fully cached rerun more than its queries, so the version is
    remembered on disk with the stat stamps (file_digests.stamp) of the modules it read and of
    every folder of the package: a folder's stamp moves when a module is added to it or
    removed, which can change what an import names. A process then only stats those paths.
    """
    memo_file = cache_root() / "code_versions.json"
    root = str(PACKAGE_ROOT)
    entry = read_memo(memo_file).get(root, {}).get(stage_module)
    if isinstance(entry, dict) and _unchanged(entry.get("stamps")):
        return entry["version"]
    # Stamped before the files are read: a file that changes while it is read is not trusted.
    before = _package_stamps()
    version = _digest(stage_module)
    read = [_source_path(name) for name in _pipeline_imports(stage_module)]
    stamps = {path: before.get(path) for path in
              [*read, *(path for path in before if os.path.isdir(path))]}
    if all(value is not None and settled(value) for value in stamps.values()):
        memo = read_memo(memo_file)
        # Copies of the package that are gone (a test's, an old checkout's) are forgotten.
        memo = {kept: versions for kept, versions in memo.items()
                if isinstance(versions, dict) and os.path.isdir(kept)}
        memo.setdefault(root, {})[stage_module] = {"stamps": stamps, "version": version}
        write_memo(memo_file, memo)
    return version


def _package_stamps() -> dict[str, list[int]]:
    """The stamp of every folder and module of the package."""
    stamps = {}
    for folder, subfolders, files in os.walk(PACKAGE_ROOT):
        subfolders[:] = [name for name in subfolders if name != "__pycache__"]
        for path in [folder, *(os.path.join(folder, name) for name in files
                               if name.endswith(".py"))]:
            stamps[path] = stamp(os.stat(path))
    return stamps


def _unchanged(stamps: object) -> bool:
    if not isinstance(stamps, dict) or not stamps:
        return False
    try:
        return all(stamp(os.stat(path)) == recorded for path, recorded in stamps.items())
    except OSError:
        return False


def _digest(stage_module: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(_pipeline_imports(stage_module)):
        path = Path(_source_path(name))
        stamp = path.stat()
        code = _code_of(str(path), stamp.st_mtime_ns, stamp.st_size)
        digest.update(name.encode() + b"\0" + code.encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def _code_of(path: str, mtime_ns: int, size: int) -> str:
    """The module's code as its syntax tree, docstrings dropped (comments never reach it).
    Remembered per (path, mtime, size) because main takes a key for every training."""
    tree = ast.parse(Path(path).read_bytes())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def cache_key(stage: str, identity: dict, stage_module: str) -> str:
    """What makes two runs of a stage interchangeable: stage, inputs, upstream runs, code."""
    payload = json.dumps(
        {"stage": stage, "identity": identity, "code": code_version(stage_module)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]
