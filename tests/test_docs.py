"""The README's generated tables match rules/ (regenerate with `python -m onnxlrp.docs`)."""
from __future__ import annotations

import re
from pathlib import Path

from onnxlrp.docs import generated_sections

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_match_rules():
    text = README.read_text()
    for key, table in generated_sections().items():
        match = re.search(rf"<!-- BEGIN {key} [^>]*-->\n(.*?)<!-- END {key} -->", text, flags=re.S)
        assert match, f"README lacks the generated {key} section"
        assert match.group(1).strip() == table.strip(), f"README {key} table is stale: run python -m onnxlrp.docs --write"
