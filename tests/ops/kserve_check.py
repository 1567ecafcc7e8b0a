"""The KServe SDK's REST client against a running server, in a process of its own:

    python tests/ops/kserve_check.py URL MODEL DATA.npz    # prints one JSON object

``kserve`` registers its gRPC messages in protobuf's default pool under the protocol's package
(``inference``), and so does ``tritonclient.grpc``: the two cannot be imported into one process, and
the test process imports tritonclient.grpc. ``tests/ops/test_v2_clients.py`` runs this and checks
what it prints. DATA.npz holds ``pngs`` (object array of PNG bytes) and ``pixels`` (``[N, H, W, 3]`` uint8).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import numpy as np


async def scenario(url: str, model: str, pngs: list[bytes], pixels: np.ndarray) -> dict[str, Any]:
    import kserve
    from kserve.protocol.infer_type import RequestedOutput

    client = kserve.InferenceRESTClient(kserve.RESTConfig(protocol="v2", retries=0, timeout=60))
    out: dict[str, Any] = {}
    try:
        out["live"] = await client.is_server_live(url)
        out["ready"] = await client.is_server_ready(url)
        out["model_ready"] = await client.is_model_ready(url, model)

        images = kserve.InferInput("images", [len(pngs)], "BYTES")
        images.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
        response = await client.infer(url, kserve.InferRequest(model, [images], parameters={"top_k": 1}),
                                      model_name=model)
        labels = {o.name: o for o in response.outputs}["labels"].as_numpy().ravel()
        out["labels"] = [v.decode() if isinstance(v, bytes) else str(v) for v in labels]

        raw = kserve.InferInput("pixels", list(pixels.shape), "UINT8")
        raw.set_data_from_numpy(pixels, binary_data=False)  # JSON data
        request = kserve.InferRequest(model, [raw], request_outputs=[RequestedOutput("probabilities")])
        (probs,) = (await client.infer(url, request, model_name=model)).outputs
        out["argmax"] = probs.as_numpy().argmax(axis=1).tolist()

        try:
            await client.infer(url, kserve.InferRequest("nope", [raw]), model_name="nope")
            out["missing"] = None
        except httpx.HTTPStatusError as exc:
            out["missing"] = {"status": exc.response.status_code, "error": exc.response.json()["error"]}
    finally:
        await client.close()
    return out


def main() -> int:
    url, model, data = sys.argv[1:4]
    arrays = np.load(data, allow_pickle=True)
    print(json.dumps(asyncio.run(scenario(url, model, list(arrays["pngs"]), arrays["pixels"]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
