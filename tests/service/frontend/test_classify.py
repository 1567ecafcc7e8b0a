"""POST /classify through the real app: shapes, input order, every input form, options, worker errors."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import CLASSES, all_kinds, encode, photo

from service.protocol import Lifecycle

K, L, GRID = 2, 6, 4  # vit_nano_patch8_32: stages start at blocks 2/3/4 of 6, 4x4 patches


def png(seed: int) -> bytes:
    return encode(photo((48, 40), seed), "PNG")


def post_files(client: TestClient, images: list[bytes], field: str = "files", **kw: Any) -> Any:
    return client.post("/classify", files=[(field, (f"{i}.png", b, "image/png")) for i, b in enumerate(images)],
                       **kw)


def probs(result: dict[str, Any]) -> dict[str, float]:
    return {lab["label"]: lab["probability"] for lab in result["labels"]}


def test_single_image_response_shape(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("a.png", png(0), "image/png")}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "nano-test" and len(body["results"]) == 1
    res = body["results"][0]
    labels = res["labels"]
    assert len(labels) == 3 and all(lab["label"] == CLASSES[lab["index"]] for lab in labels)
    ps = [lab["probability"] for lab in labels]
    assert ps == sorted(ps, reverse=True) and 0 < sum(ps) <= 1.0 + 1e-6
    life = res["lifespans"]
    assert (life["rows"], life["cols"]) == (GRID, GRID) and len(life["values"]) == GRID
    assert all(len(row) == GRID and all(K <= v <= L for v in row) for row in life["values"])
    b = res["budget"]
    assert len(b["patch_counts"]) == 3 and all(o <= c for o, c in zip(b["patch_counts"], b["counts_run"], strict=True))
    assert b["fraction_of_dense"] == pytest.approx(b["gflops"] / b["dense_gflops"])
    assert b["keep_rate"] == pytest.approx(0.7)
    assert all(res["timings_ms"][k] >= 0 for k in ("decode", "queue", "compute"))
    assert res["timings_ms"]["compute"] > 0


def test_lives_agree_with_budget(client: TestClient) -> None:
    """Patches alive at each stage start, counted from the returned lives, are the image's own budget."""
    res = post_files(client, [png(3)]).json()["results"][0]
    lives = [v for row in res["lifespans"]["values"] for v in row]
    alive = [sum(v > start for v in lives) for start in (2, 3, 4)]
    assert [max(1, a) for a in alive] == res["budget"]["patch_counts"]


def test_results_in_input_order_and_equal_to_single_requests(client: TestClient) -> None:
    images = [png(s) for s in (1, 2, 3, 4)]
    singles = [post_files(client, [im]).json()["results"][0] for im in images]
    assert len({tuple(sorted(probs(s).items())) for s in singles}) == 4  # the images really differ
    together = post_files(client, images).json()["results"]
    for one, many in zip(singles, together, strict=True):
        assert probs(one).keys() == probs(many).keys()
        for k, p in probs(one).items():
            assert probs(many)[k] == pytest.approx(p, abs=1e-4)
        flat = [v for row in one["lifespans"]["values"] for v in row]
        assert flat == pytest.approx([v for row in many["lifespans"]["values"] for v in row], abs=1e-3)
        assert one["budget"]["patch_counts"] == many["budget"]["patch_counts"]


def test_json_base64_and_raw_body_match_multipart(client: TestClient) -> None:
    data = png(5)
    ref = probs(post_files(client, [data], field="file").json()["results"][0])
    b64 = base64.b64encode(data).decode()
    for body in ({"images": [b64]}, {"images": ["data:image/png;base64," + b64]},
                 {"images": [b64[:40] + "\n" + b64[40:]]}):
        r = client.post("/classify", json=body)
        assert r.status_code == 200, r.text
        assert probs(r.json()["results"][0]) == pytest.approx(ref, abs=1e-5)
    r = client.post("/classify", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 200 and probs(r.json()["results"][0]) == pytest.approx(ref, abs=1e-5)


@pytest.mark.parametrize("name", sorted(all_kinds()))
def test_every_image_kind_is_classified(client: TestClient, name: str) -> None:
    r = client.post("/classify", files={"file": (name, all_kinds()[name], "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert len(r.json()["results"][0]["labels"]) == 5


def test_top_k_from_query_form_or_json(client: TestClient) -> None:
    data = png(6)
    assert len(post_files(client, [data], params={"top_k": 1}).json()["results"][0]["labels"]) == 1
    assert len(post_files(client, [data], data={"top_k": "2"}).json()["results"][0]["labels"]) == 2
    r = client.post("/classify", json={"images": [base64.b64encode(data).decode()], "top_k": 4})
    assert len(r.json()["results"][0]["labels"]) == 4
    same = post_files(client, [data], params={"top_k": 2}, data={"top_k": "2"})
    assert same.status_code == 200


def test_keep_rate_changes_the_budget(client: TestClient) -> None:
    data = png(7)
    full = post_files(client, [data], params={"keep_rate": 1.0}).json()["results"][0]["budget"]
    low = post_files(client, [data], data={"keep_rate": "0.3"}).json()["results"][0]["budget"]
    assert full["keep_rate"] == 1.0 and low["keep_rate"] == pytest.approx(0.3)
    assert full["patch_counts"] == [GRID * GRID] * 3
    assert all(lo <= f for lo, f in zip(low["patch_counts"], full["patch_counts"], strict=True))
    assert sum(low["patch_counts"]) < sum(full["patch_counts"]) and low["gflops"] < full["gflops"]


def test_deadline_header(client: TestClient, metric: Callable[..., float]) -> None:
    assert post_files(client, [png(8)], headers={"X-Request-Deadline-Ms": "60000"}).status_code == 200
    before = metric(client, "patchlife_rejected_requests_total", {"reason": "deadline"})
    r = post_files(client, [png(8)], headers={"X-Request-Deadline-Ms": "0.0001"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
    assert metric(client, "patchlife_rejected_requests_total", {"reason": "deadline"}) == before + 1


def test_overload_is_503_with_retry_after(make_client: Callable[..., TestClient],
                                          metric: Callable[..., float]) -> None:
    small = make_client(queue_capacity_images=1)
    r = post_files(small, [png(1), png(2)])
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
    assert int(r.headers["retry-after"]) >= 1
    assert metric(small, "patchlife_rejected_requests_total", {"reason": "overloaded"}) == 1
    assert post_files(small, [png(1)]).status_code == 200


def test_shutting_down_is_503(make_client: Callable[..., TestClient], metric: Callable[..., float]) -> None:
    c = make_client()
    c.app.state.frontend.state = Lifecycle.DRAINING  # type: ignore[attr-defined]
    r = post_files(c, [png(1)])
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert metric(c, "patchlife_rejected_requests_total", {"reason": "shutdown"}) == 1
