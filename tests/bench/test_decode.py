"""``patchlife bench-decode`` on a CPU machine: the CPU path, and the batched code on torchvision's CPU decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from service_support import all_kinds

from bench.photos import PHOTO_SIZES, default_photos, photo_image
from cli.main import main


def test_generated_photos_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-decode", "--sizes", "224px,640x480", "--device", "cpu", "--batch-sizes", "1,4",
                 "--seconds", "0.01", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [r["images"] for r in body["rows"]] == ["224px", "640x480"]
    for row in body["rows"]:
        assert set(row) == {"images", "cpu path", "cpu b1", "cpu b4", "fallbacks"}
        assert all(row[k] > 0 for k in ("cpu path", "cpu b1", "cpu b4")) and row["fallbacks"] == {}


def test_a_folder_of_images_and_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kinds = all_kinds()
    for name in ("jpeg", "png", "jpeg_exif_rotated", "webp"):
        (tmp_path / name).write_bytes(kinds[name])
    assert main(["bench-decode", "--images", str(tmp_path), "--device", "none", "--seconds", "0.01"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| images | cpu path ms/img |" and out[2].startswith(f"| {tmp_path.name} (4 files) | ")


@pytest.mark.parametrize("argv", [["--sizes", "8k"], ["--batch-sizes", "0"], ["--seconds", "0"],
                                  ["--images", "/nonexistent"]])
def test_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench-decode", "--device", "none", *argv]) == 2
    assert "patchlife bench-decode:" in capsys.readouterr().err


def test_photos_are_photo_sized() -> None:
    """The generated photos compress like camera photos (0.2-0.6 bytes per pixel at quality 90), so a
    decoder's time on them is its time on real ones."""
    photos = default_photos()
    assert list(photos) == [n for n, _, _ in PHOTO_SIZES]
    for name, w, h in PHOTO_SIZES:
        assert 0.2 <= len(photos[name]) / (w * h) <= 0.6, name
    assert photo_image(64, 48, seed=1).tobytes() == photo_image(64, 48, seed=1).tobytes()
