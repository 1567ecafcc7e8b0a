"""Settings: the docs' table is generated from the class; the new knobs parse and validate."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_docs_settings_table_is_the_generated_one() -> None:
    text = DOCS.read_text()
    begin = text.index("<!-- settings:begin")
    table = text[text.index("\n", begin) + 1:text.index("<!-- settings:end -->")].strip()
    assert table == markdown_table(), "docs/api.md is stale: paste `python -m service.settings` between the markers"
    assert table.count("\n| `PATCHLIFE_") == len(Settings.model_fields)


def test_grid_keep_rates_and_dtype_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATCHLIFE_BUCKET_KEEP_RATES", "0.3, 0.6")
    s = Settings()
    assert s.grid_keep_rates() == (0.3, 0.6) and s.dtype == "auto" and s.cuda_graphs == "auto"
    assert Settings(device="cpu", dtype="auto").dtype == "auto"
    for bad in ("0.3,x", "0,0.5", "1.5"):
        with pytest.raises(ValidationError):
            Settings(bucket_keep_rates=bad)
    with pytest.raises(ValidationError):
        Settings(device="cpu", dtype="bfloat16")
