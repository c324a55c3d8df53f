"""Writes the parameter tables of docs/stages.md from MLproject, where every parameter is
declared once with its type, default and meaning (the same text `python -m pipeline <stage>
--help` prints). Run after editing MLproject:

    python docs/parameters.py

tests/test_docs.py fails while the committed tables differ from what this writes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "stages.md"
BEGIN = "<!-- parameters: written by `python docs/parameters.py` from MLproject; edit MLproject, not this -->"
END = "<!-- end of the generated parameters -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def parameter_reference(points: dict) -> str:
    """One section per entry point: its description, then a table of its parameters."""
    sections = []
    for stage, point in points.items():
        lines = [f"### `{stage}`", "", _cell(point.get("description", "")), "",
                 "| parameter | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, spec in point.get("parameters", {}).items():
            default = spec.get("default", "")
            shown = f"`{default}`" if str(default) != "" else "(empty)"
            lines.append(f"| `{name}` | {spec.get('type', 'string')} | {shown} | "
                         f"{_cell(spec.get('help', ''))} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def render(page: str, points: dict) -> str:
    """`page` with the text between the two markers replaced by the generated tables."""
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{parameter_reference(points)}\n\n{END}{tail}"


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from pipeline.parameters import entry_points

    PAGE.write_text(render(PAGE.read_text(), entry_points()))
    print(f"wrote the parameter tables of {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
