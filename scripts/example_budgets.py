"""What the served model keeps of each of its example images: the numbers behind README's budget sentence.

    python scripts/example_budgets.py                 # the embedded default model
    python scripts/example_budgets.py --checkpoint runs/flowers

Each example listed in ``<checkpoint>/examples/examples.json`` goes through ``POST /classify`` of the
in-process service (the model's own keep rate, CPU), and one line per image prints its kept patches per
pruning stage (``budget.patch_counts``), its share of dense GFLOPs and its top label. ``--sentence``
prints instead the clause README.md quotes (tests/scripts/test_example_budgets.py checks that README
says the same, so a retrained model means rerunning this and pasting its line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def budgets(checkpoint: Path | None) -> list[dict[str, Any]]:
    """One row per listed example: file, label (as listed), patch_counts, fraction_of_dense, top label."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(checkpoint=checkpoint, device="cpu", grpc_port=0)  # type: ignore[arg-type]
    rows = []
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 300
        while client.get("/readyz").status_code != 200:  # warm-up runs in the background
            if time.monotonic() > deadline:
                raise SystemExit(f"the model did not turn ready: {client.get('/readyz').json()}")
            time.sleep(0.1)
        for example in client.get("/v1/examples").json()["examples"]:
            image = client.get(example["url"]).content
            answer = client.post("/classify", files={"file": (example["file"], image)})
            answer.raise_for_status()
            result = answer.json()["results"][0]
            rows.append({"file": example["file"], "label": example["label"],
                         "patch_counts": result["budget"]["patch_counts"],
                         "fraction_of_dense": result["budget"]["fraction_of_dense"],
                         "top": result["labels"][0]["label"]})
    return rows


def sentence(rows: list[dict[str, Any]]) -> str:
    """``empty 1/1/1, simple 13/11/7, ...``: each example (file name without extension) and its kept counts."""
    return ", ".join(f"{Path(r['file']).stem} {'/'.join(map(str, r['patch_counts']))}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--sentence", action="store_true", help="print only README's clause")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    rows = budgets(args.checkpoint)
    if args.sentence:
        print(sentence(rows))
    elif args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            counts = "/".join(map(str, r["patch_counts"]))
            print(f"{r['file']:<14} {r['label']:<15} kept {counts:<10} {r['fraction_of_dense']:.2f} of dense GFLOPs, "
                  f"top-1 {r['top']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
