"""The web page's routes: GET / and its static files, GET /v1/examples and the example images."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo, wait_ready

from service.app import create_app
from service.frontend.routes.ui import STATIC_DIR, read_examples
from service.settings import Settings

EXAMPLES = [{"file": "simple.png", "label": "cat", "note": "one object, plain background"},
            {"file": "busy.jpg", "label": "dog", "note": "clutter"}]


def write_examples(checkpoint: Path, entries: list[dict[str, str]] | str, files: dict[str, bytes]) -> Path:
    folder = checkpoint / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (folder / "examples.json").write_text(entries if isinstance(entries, str) else json.dumps(entries))
    return folder


@pytest.fixture(scope="module")
def examples_client(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """An app on a copy of the test checkpoint with two listed examples, plus files it must not serve."""
    ckpt = Path(shutil.copytree(checkpoint_dir, tmp_path_factory.mktemp("ui") / "ckpt"))
    listed = [*EXAMPLES, {"file": "../config.json", "label": "x", "note": "outside the folder"},
              {"file": "missing.png", "label": "x", "note": "no such file"}]
    write_examples(ckpt, listed, {"simple.png": encode(photo(seed=1), "PNG"),
                                  "busy.jpg": encode(photo(seed=2), "JPEG"),
                                  "unlisted.png": encode(photo(seed=3), "PNG")})
    settings = Settings(checkpoint=ckpt, device="cpu", warmup_batches=1, max_delay_ms=1.0, grpc_port=0)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def test_page_is_served_at_root(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>patchlife</h1>" in r.text and 'src="/static/app.js"' in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]


def test_every_file_the_page_references_is_served_with_its_type(client: TestClient) -> None:
    html = client.get("/").text
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', html)
    assert sorted(refs) == ["/static/app.js", "/static/heatmap.js", "/static/live.js", "/static/style.css"]
    types = {".js": "text/javascript", ".css": "text/css"}
    for ref in refs:
        r = client.get(ref)
        assert r.status_code == 200, ref
        assert r.headers["content-type"].split(";")[0] == types[Path(ref).suffix]
        assert r.content == (STATIC_DIR / Path(ref).name).read_bytes()


def test_the_page_fetches_nothing_from_outside() -> None:
    """Offline: no absolute URL to another host in any static file (links to /docs are relative)."""
    for path in STATIC_DIR.iterdir():
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", path.read_text()), path.name


@pytest.mark.parametrize("path", ["/static/nope.js", "/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py",
                                  "/static/.%2F..%2F..%2Fpyproject.toml", "/static/"])
def test_unknown_static_files_are_404_json(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_no_examples_folder_is_an_empty_list(client: TestClient) -> None:
    r = client.get("/v1/examples")
    assert r.status_code == 200
    assert r.json() == {"examples": []}


def test_examples_list_only_servable_entries_with_urls(examples_client: TestClient) -> None:
    body = examples_client.get("/v1/examples").json()
    assert body == {"examples": [{**e, "url": f"/v1/examples/{e['file']}"} for e in EXAMPLES]}


def test_example_images_are_served(examples_client: TestClient) -> None:
    folder = Path(examples_client.app.state.frontend.card.checkpoint) / "examples"  # type: ignore[attr-defined]
    for entry, media_type in zip(examples_client.get("/v1/examples").json()["examples"], ["image/png", "image/jpeg"]):
        r = examples_client.get(entry["url"])
        assert r.status_code == 200
        assert r.headers["content-type"] == media_type
        assert r.content == (folder / entry["file"]).read_bytes()


@pytest.mark.parametrize("name", [
    "unlisted.png",           # in the folder, not in examples.json
    "examples.json",          # the listing itself
    "missing.png",            # listed, file absent
    "..%2Fconfig.json",       # listed (and left out), outside the folder
    "%2e%2e%2fconfig.json",
    "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
    "%2Fetc%2Fpasswd",
    "simple.png%00.txt",
    "SIMPLE.PNG",
    "..",
])
def test_unlisted_or_traversing_names_are_404_json(examples_client: TestClient, name: str) -> None:
    r = examples_client.get(f"/v1/examples/{name}")
    assert r.status_code == 404, r.content[:100]
    assert r.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(("listing", "files", "expected"), [
    ("{not json", {"a.png": b"x"}, []),
    (json.dumps({"file": "a.png"}), {"a.png": b"x"}, []),
    (json.dumps([{"file": "a.png", "label": "cat", "note": ""}, {"label": "no file"}, {"file": 3},
                 {"file": "sub/a.png"}, {"file": ".hidden.png"}, {"file": "notes.txt"}]),
     {"a.png": b"x", ".hidden.png": b"x", "notes.txt": b"x"}, [{"file": "a.png", "label": "cat", "note": ""}]),
])
def test_malformed_listings_leave_entries_out(tmp_path: Path, listing: str, files: dict[str, bytes],
                                              expected: list[dict[str, str]]) -> None:
    write_examples(tmp_path, listing, files)
    assert read_examples(tmp_path) == expected

