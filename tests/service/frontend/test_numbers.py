"""The strict number parser, alone and through every way a number reaches the service (query, form,
JSON, /v2 parameters, headers): the probes that got a 500 or were wrongly accepted get a 422 (400 for
the v2 framing header) that names the field."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import encode, photo

from service.frontend import oip
from service.frontend.errors import InvalidRequest
from service.frontend.numbers import parse_float, parse_int

GOOD = encode(photo((40, 40)), "PNG")
B64 = base64.b64encode(GOOD).decode()
INFER = "/v2/models/nano-test/infer"
HUGE = int("9" * 400)  # float() of it raises OverflowError

BAD_INTS: list[Any] = ["+-5", "--1", "²", "٣", "1_0", "0x5", "5.0", "", " ", "1e2", True, False, None, 2.0,
                       "9" * 30, HUGE, b"\xff", "5\x00", "nan"]
BAD_RATES: list[Any] = ["5e-324", 5e-324, "1e-400", True, False, "nan", "inf", "-inf", float("nan"),
                        float("inf"), HUGE, str(HUGE), "²", "٠.5", "0x1p-1", "0", 0, "1.0000001", "+-0.5",
                        "1e99999", None, [0.5], "0.5" * 30]


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
def test_parse_int_refuses(value: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_int(value, "top_k", 1, 20)
    assert err.value.status == 422 and "top_k" in err.value.message


@pytest.mark.parametrize(("value", "want"), [(5, 5), ("5", 5), (" 7 ", 7), ("+3", 3), ("020", 20), (b"4", 4)])
def test_parse_int_accepts(value: Any, want: int) -> None:
    assert parse_int(value, "top_k", 1, 20) == want


@pytest.mark.parametrize("value", BAD_RATES, ids=repr)
def test_parse_float_refuses(value: Any) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_float(value, "keep_rate", 0.0, 1.0, low_open=True)
    assert "keep_rate" in err.value.message


@pytest.mark.parametrize(("value", "want"), [(0.7, 0.7), ("0.7", 0.7), (".5", 0.5), ("5e-1", 0.5), (1, 1.0),
                                             ("1", 1.0), ("1.", 1.0), (1e-300, 1e-300)])
def test_parse_float_accepts(value: Any, want: float) -> None:
    assert parse_float(value, "keep_rate", 0.0, 1.0, low_open=True) == want


def _assert_422(r: Any, field: str) -> None:
    assert r.status_code == 422, r.text
    body = r.json()
    message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    assert field in message, message


@pytest.mark.parametrize("value", ["+-5", "--1", "²", "٣", "true", "1_0"])
def test_top_k_probes_through_query_and_form(client: TestClient, value: str) -> None:
    _assert_422(client.post("/classify", files={"file": ("a.png", GOOD, "image/png")}, data={"top_k": value}),
                "top_k")
    _assert_422(client.post("/classify", files={"file": ("a.png", GOOD, "image/png")}, params={"top_k": value}),
                "top_k")


@pytest.mark.parametrize("value", [True, "²", "٣", "+-5", HUGE, 2.5])
def test_top_k_probes_through_json_and_v2(client: TestClient, value: Any) -> None:
    body = json.dumps({"images": [B64], "top_k": value})
    _assert_422(client.post("/classify", content=body, headers={"content-type": "application/json"}), "top_k")
    v2 = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [B64]}],
                     "parameters": {"top_k": value}})
    _assert_422(client.post(INFER, content=v2, headers={"content-type": "application/json"}), "top_k")


@pytest.mark.parametrize("raw", ["true", "5e-324", "1e400", "9" * 400, '"nan"', '"²"', "0"])
def test_keep_rate_probes_through_json_and_v2(client: TestClient, raw: str) -> None:
    body = '{"images": ["' + B64 + '"], "keep_rate": ' + raw + "}"
    _assert_422(client.post("/classify", content=body, headers={"content-type": "application/json"}), "keep_rate")
    v2 = ('{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["' + B64 + '"]}], '
          '"parameters": {"keep_rate": ' + raw + "}}")
    _assert_422(client.post(INFER, content=v2, headers={"content-type": "application/json"}), "keep_rate")


@pytest.mark.parametrize("value", ["²", "5e-324", "nan", "inf", "9" * 400, "1_000"])
def test_keep_rate_probes_through_form_and_query(client: TestClient, value: str) -> None:
    _assert_422(client.post("/classify", files={"file": ("a.png", GOOD, "image/png")}, data={"keep_rate": value}),
                "keep_rate")
    _assert_422(client.post("/explain", files={"file": ("a.png", GOOD, "image/png")}, params={"keep_rate": value}),
                "keep_rate")


@pytest.mark.parametrize("value", ["²", "nan", "inf", "0", "-5", "9" * 400, "1e400", "3600001"])
def test_deadline_header_probes(client: TestClient, value: str) -> None:
    _assert_422(client.post("/classify", files={"file": ("a.png", GOOD, "image/png")},
                            headers={"X-Request-Deadline-Ms": value.encode()}), "X-Request-Deadline-Ms")


@pytest.mark.parametrize("value", ["²", "٣", "+-5", "-1", "9" * 400, "1e2"])
def test_v2_header_length_probes(client: TestClient, value: str) -> None:
    r = client.post(INFER, content=b'{"inputs": []}', headers={oip.HEADER_LENGTH: value.encode(),
                                                                "content-type": "application/octet-stream"})
    assert r.status_code == 400 and oip.HEADER_LENGTH in r.json()["error"], r.text


def test_same_value_in_query_and_form_is_no_conflict(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("a.png", GOOD, "image/png")}, data={"top_k": "02"},
                    params={"top_k": "2"})
    assert r.status_code == 200 and len(r.json()["results"][0]["labels"]) == 2
