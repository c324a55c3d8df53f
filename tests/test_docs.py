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

from pipeline.parameters import entry_points

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


FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`]+`")


def _unwrap_inline_code(text: str) -> str:
    """An inline code span may wrap onto the next line; a fenced block keeps its lines."""
    pieces, last = [], 0
    for fence in FENCE.finditer(text):
        prose = text[last:fence.start()]
        pieces += [INLINE_CODE.sub(lambda m: m.group(0).replace("\n", " "), prose), fence.group(0)]
        last = fence.end()
    pieces.append(INLINE_CODE.sub(lambda m: m.group(0).replace("\n", " "), text[last:]))
    return "".join(pieces)


def command_problems(text: str) -> list[str]:
    """What is wrong with each command in `text`: an unknown stage or parameter."""
    points = entry_points()
    problems = []
    for match in COMMAND.finditer(_unwrap_inline_code(text)):
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
                if stage.startswith("<"):
                    continue  # `mlflow run . -e <stage>`: a placeholder
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


def anchors(page: Path) -> set[str]:
    """The fragments GitHub gives a page's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def link_problems(doc: Path, root: Path = REPO_ROOT) -> list[str]:
    problems = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        file, _, fragment = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            problems.append(f"{doc.relative_to(root)}: link to {target} resolves to nothing")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path):
            problems.append(f"{doc.relative_to(root)}: link to {target} names no heading there")
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
    mlflow run . -e <stage> -P <name>=<value>
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


def test_a_command_wrapped_over_two_lines_is_read_whole():
    text = "the sweep (`python -m pipeline tune --data_dir data\n--trails 6`) and\n" \
           "```\npython -m pipeline tune --trials 6\n--not-an-option\n```\n"
    assert command_problems(text) == [
        "'python -m pipeline tune --data_dir data --trails 6': tune has no parameter 'trails'"]


def test_a_broken_link_is_caught(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("# Top\n[there](page.md) [gone](missing.png) [web](https://mlflow.org) [top](#top)")
    assert link_problems(doc, root=tmp_path) == [
        "page.md: link to missing.png resolves to nothing"]


def test_a_link_to_a_missing_heading_is_caught(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n\n## Full MNIST, per-sample `cost`\n")
    doc = tmp_path / "page.md"
    doc.write_text("# Page: the `tune` stage\n\n[a](other.md#full-mnist-per-sample-cost) "
                   "[b](#page-the-tune-stage) [c](other.md#gone) [d](#nowhere)\n")
    assert link_problems(doc, root=tmp_path) == [
        "page.md: link to other.md#gone names no heading there",
        "page.md: link to #nowhere names no heading there"]


# --- Reference tables that the code, not a person, keeps true ---------------------------------

# NAME_WITH_UNDERSCORES, or one of PostgreSQL's, which have none (PGPASSFILE, PGDATA).
ENV_NAME = re.compile(r"""["']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+|PG[A-Z]+)["']""")
# Upper-case string literals beside os.environ that are not environment variables.
NOT_ENV = {"PG_VERSION"}  # a file in a PostgreSQL cluster's folder
MAKE_VARIABLE = re.compile(r"^(?:export )?([A-Z_]+) \?=", re.M)
MAKE_REFERENCE = re.compile(r"\$\(([A-Z_]+)\)")
CODE_NAME = re.compile(r"`([^`]+)`")


def table_rows(page: Path, heading: str) -> list[str]:
    """The first cell of each row of the table under `heading` (a Markdown heading's text)."""
    text = page.read_text()
    start = text.index(f"\n{heading}\n") + 1
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            rows.append(line.split("|")[1].strip())
    return rows[1:]  # the header row


def environment_variables(package: Path = REPO_ROOT / "pipeline") -> set[str]:
    """Every variable name a module of the package reads from or sets in its environment."""
    names = set()
    for module in package.rglob("*.py"):
        source = module.read_text()
        if "os.environ" in source or "getenv" in source:
            names |= set(ENV_NAME.findall(source))
    return names - NOT_ENV


def makefile_variables(makefile: Path = REPO_ROOT / "Makefile") -> set[str]:
    """What `make VAR=...` can set: the `?=` defaults and the variables used but never set."""
    text = makefile.read_text()
    assigned = set(re.findall(r"^(?:export )?([A-Z_]+) [:?]?=", text, re.M))
    return set(MAKE_VARIABLE.findall(text)) | (set(MAKE_REFERENCE.findall(text)) - assigned)


def test_every_environment_variable_the_code_reads_or_sets_is_in_one_table():
    page = REPO_ROOT / "docs" / "configuration.md"
    rows = [CODE_NAME.sub(r"\1", row) for row in table_rows(page, "## Environment variables")]
    assert sorted(set(rows)) == sorted(rows), "a variable has two rows"
    assert sorted(environment_variables()) == sorted(rows)


def test_every_makefile_variable_is_in_one_table():
    page = REPO_ROOT / "docs" / "configuration.md"
    rows = [CODE_NAME.sub(r"\1", row) for row in table_rows(page, "## Makefile variables")]
    assert sorted(set(rows)) == sorted(rows), "a variable has two rows"
    assert sorted(makefile_variables()) == sorted(rows)


def test_the_reference_tables_see_a_new_variable(tmp_path):
    (tmp_path / "a.py").write_text('import os\nX = os.environ.get("PIPELINE_NEW_KNOB")\n')
    (tmp_path / "b.py").write_text('LABEL = "NOT_AN_ENV_READ"\n')  # no os.environ here
    assert environment_variables(tmp_path) == {"PIPELINE_NEW_KNOB"}
    (tmp_path / "Makefile").write_text("A ?= 1\nB := 2\nrun:\n\techo $(A) $(B) $(C)\n")
    assert makefile_variables(tmp_path / "Makefile") == {"A", "C"}


def test_the_architecture_page_lists_every_module_once():
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    listed = re.findall(r"`(pipeline/[\w/]+\.py)`", page)
    modules = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "pipeline").rglob("*.py"))
    assert sorted(set(listed)) == sorted(listed), "a module is listed twice"
    assert sorted(listed) == modules


def test_the_parameter_reference_is_the_one_generated_from_mlproject():
    page = REPO_ROOT / "docs" / "stages.md"
    parameters = _load_generator()
    assert parameters.render(page.read_text(), entry_points()) == page.read_text(), (
        "docs/stages.md's parameter tables differ from MLproject: run python docs/parameters.py")


def test_the_generated_reference_has_every_parameter_of_every_stage():
    reference = _load_generator().parameter_reference(entry_points())
    for stage, point in entry_points().items():
        assert f"### `{stage}`" in reference
        for name in point.get("parameters", {}):
            assert f"| `{name}` |" in reference


def test_evaluate_is_described_as_loading_the_model_the_way_it_does():
    description = entry_points()["evaluate"]["description"]
    source = (REPO_ROOT / "pipeline" / "stages" / "evaluate.py").read_text()
    assert "mlflow.pytorch.load_model(" in source and "pyfunc.load_model(" not in source
    assert "mlflow.pytorch" in description and "pyfunc" not in description


def _load_generator():
    import importlib.util
    spec = importlib.util.spec_from_file_location("parameters", REPO_ROOT / "docs" / "parameters.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
