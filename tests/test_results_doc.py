"""docs/results.md is written by more than one script: ``benchmarks/results.py`` rewrites it wholesale
and must carry over the sections other scripts own (``benchmarks/doc_sections.py`` markers), and a
script rewriting its own section leaves the rest of the file alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks import results
from benchmarks.doc_sections import generated_sections, write_section

ROOT = Path(__file__).resolve().parents[1]


def test_sections_are_replaced_in_place_and_survive_the_main_results_rewrite(tmp_path):
    (tmp_path / "figures").mkdir()
    shutil.copy(ROOT / "docs" / "figures" / "results.json", tmp_path / "figures" / "results.json")
    doc = tmp_path / "results.md"
    results.main(["--render-only", "--out", str(tmp_path)])
    assert generated_sections(doc) == ""
    write_section(doc, "timeseries", "## Time series\n\nALPHA-1")
    write_section(doc, "other", "## Other\n\nBETA-kept")
    write_section(doc, "timeseries", "## Time series\n\nALPHA-2")  # replaced where it stands
    text = doc.read_text()
    assert "ALPHA-1" not in text and text.index("ALPHA-2") < text.index("BETA-kept") and text.count("## Time series") == 1
    results.main(["--render-only", "--out", str(tmp_path)])
    text = doc.read_text()
    assert text.startswith("# Results") and "## Table 1" in text and text.count("# Results") == 1
    assert text.index("## Table 1") < text.index("ALPHA-2") < text.index("BETA-kept")
    assert text.count("<!-- timeseries:begin -->") == 1 and text.count("<!-- other:end -->") == 1
