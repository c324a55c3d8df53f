"""The docs cannot go stale: every `python -m pipeline ...`, `mlflow run ...` and
`make run ARGS=...` command in README.md and docs/ names a stage that exists and only
parameters that stage has (read from MLproject, as the CLI is), and every relative link
resolves."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from pipeline.cli import entry_points

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("**/*.md"))]
# Options of `python -m pipeline <stage>` that are not MLproject parameters.
CLI_OPTIONS = {"experiment", "help", "h"}
# A command runs to the end of its line, its inline-code span, or a shell comment.
COMMAND = re.compile(r"(python -m pipeline\s+[^\s`]+[^`\n#]*|mlflow run\s+\.[^`\n#]*"
                     r"|make run ARGS=\"[^\"]*\")")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _tokens(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote inside prose: split on spaces
        return command.split()


def command_problems(text: str) -> list[str]:
    """What is wrong with each command in `text`: an unknown stage or parameter."""
    points = entry_points()
    problems = []
    for match in COMMAND.finditer(text):
        command = match.group(1).strip()
        tokens = _tokens(command)
        if command.startswith("make run ARGS="):
            tokens = _tokens(tokens[2].removeprefix("ARGS="))
        if command.startswith("python -m pipeline"):
            if len(tokens) < 4 or tokens[2] != "pipeline" or tokens[3].startswith("<"):
                continue  # `python -m pipeline <stage>`: a placeholder
            stage = tokens[3]
            if stage not in points:
                problems.append(f"{command!r}: no stage {stage!r}")
                continue
            known = set(points[stage].get("parameters", {})) | CLI_OPTIONS
            names = [t[2:].split("=")[0] for t in tokens[4:] if t.startswith("--")]
        else:
            stage = "main"
            if command.startswith("mlflow run"):
                for flag, value in zip(tokens, tokens[1:]):
                    if flag in ("-e", "--entry-point"):
                        stage = value
                if stage not in points:
                    problems.append(f"{command!r}: no entry point {stage!r}")
                    continue
            known = set(points[stage].get("parameters", {}))
            names = [value.split("=")[0] for flag, value in zip(tokens, tokens[1:])
                     if flag in ("-P", "--param-list")]
            names += [t[2:].split("=")[0] for t in tokens if t.startswith("-P") and len(t) > 2]
        problems += [f"{command!r}: {stage} has no parameter {name!r}"
                     for name in names if name and name not in known and not name.startswith("<")]
    return problems


def link_problems(doc: Path, root: Path = REPO_ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^(https?:|mailto:|#)", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        if not path.exists():
            problems.append(f"{doc.relative_to(root)}: link to {target} resolves to nothing")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_command_in_the_docs_names_real_stages_and_parameters(doc):
    assert command_problems(doc.read_text()) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_in_the_docs_resolves(doc):
    assert link_problems(doc) == []


def test_a_misspelled_parameter_or_stage_in_a_doc_is_caught():
    text = """
    `python -m pipeline train --config mlp4 --epoch 2`
    ```
    mlflow run . -e train -P config=mlp4 -P lr_rate=0.1 --env-manager local
    mlflow run . -P seed=3
    python -m pipeline trian --config mlp4
    make run ARGS="-P epoch=2"
    python -m pipeline <stage> --help
    python -m pipeline main --study experiments/depth_seeds.yaml --executor ray  # fine
    ```
    """
    assert command_problems(text) == [
        "'python -m pipeline train --config mlp4 --epoch 2': train has no parameter 'epoch'",
        "'mlflow run . -e train -P config=mlp4 -P lr_rate=0.1 --env-manager local': "
        "train has no parameter 'lr_rate'",
        "'mlflow run . -P seed=3': main has no parameter 'seed'",
        "'python -m pipeline trian --config mlp4': no stage 'trian'",
        "'make run ARGS=\"-P epoch=2\"': main has no parameter 'epoch'",
    ]


def test_a_broken_link_is_caught(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("[there](page.md) [gone](missing.png) [web](https://mlflow.org) [top](#top)")
    assert link_problems(doc, root=tmp_path) == [
        "page.md: link to missing.png resolves to nothing"]
