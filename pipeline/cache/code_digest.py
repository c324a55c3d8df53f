"""A stage's code version: the digest of its module and of every pipeline module it imports,
found by reading their source (nothing is imported, so keys cost no torch start-up), and the
cache key built on it."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path

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
    """
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
