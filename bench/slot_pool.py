"""CPU cost of taking and giving back pixel slots: one API process's private pool against the pool all
API processes share (``service/transport/slots.py``: an ``flock`` and a scan of the owner table).

    python -m bench.slot_pool [--slots 384,768] [--rounds 20000]

Prints microseconds per request (a take and a give) for 1 and 32 images, and the /dev/shm the pool
reserves (pages are used only once written: the memory really held follows the slots in use at once).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

from service.transport.slots import SlotPool

SHAPE = (3, 224, 224)


def per_request_us(pool: SlotPool, images: int, rounds: int) -> float:
    t0 = time.perf_counter()
    for _ in range(rounds):
        ids = pool.take(images)
        assert ids is not None
        pool.give(ids)
    return (time.perf_counter() - t0) / rounds * 1e6


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="384,768", help="pool sizes (the defaults for 2 and 14 API processes)")
    p.add_argument("--rounds", type=int, default=20000)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for slots in (int(s) for s in args.slots.split(",")):
            print(f"{slots} slots of {list(SHAPE)}: {slots * math.prod(SHAPE) / 2**20:.0f} MiB of /dev/shm reserved")
            for name, lock in (("private", None), ("shared", Path(tmp) / "slots.lock")):
                pool = SlotPool(slots, SHAPE, lock_path=lock)
                try:
                    costs = [per_request_us(pool, n, args.rounds) for n in (1, 32)]
                finally:
                    pool.close(unlink=True)
                print(f"  {name:8s} take + give: {costs[0]:6.1f} us (1 image) {costs[1]:6.1f} us (32 images)")


if __name__ == "__main__":
    main()
