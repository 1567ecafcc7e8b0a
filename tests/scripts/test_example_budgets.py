"""README's sentence on what the example images keep is what the shipped model keeps
(scripts/example_budgets.py; after retraining the model, paste its ``--sentence`` line into README)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("example_budgets", REPO / "scripts" / "example_budgets.py")
assert _spec is not None and _spec.loader is not None
example_budgets = importlib.util.module_from_spec(_spec)
sys.modules["example_budgets"] = example_budgets
_spec.loader.exec_module(example_budgets)


def test_sentence_format() -> None:
    rows = [{"file": "empty.png", "patch_counts": [1, 1, 1]}, {"file": "busy.png", "patch_counts": [60, 19, 12]}]
    assert example_budgets.sentence(rows) == "empty 1/1/1, busy 60/19/12"


def test_readme_quotes_what_the_examples_keep() -> None:
    rows = example_budgets.budgets(None)
    assert [r["file"] for r in rows] == ["empty.png", "simple.png", "decoys.png", "three.png", "busy.png"]
    assert all(r["top"] == r["label"] for r in rows)  # the examples are answered as labelled
    line = example_budgets.sentence(rows)
    readme = " ".join((REPO / "README.md").read_text().split())  # unwrapped
    assert line in readme, f"README.md should say what the examples keep: {line} (python scripts/example_budgets.py)"
