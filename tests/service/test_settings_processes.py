"""How many API processes ``auto`` starts, the model's threads beside them, and the pixel slots."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


@pytest.mark.parametrize(("setting", "cuda", "cores", "threads", "expected"), [
    ("auto", True, 16, 0, 14),    # beside a GPU the model process keeps 2 cores
    ("auto", False, 2, 0, 1),     # CPU model, torch's default team: still one API process (it leaves one core)
    ("auto", False, 16, 4, 12),   # CPU model with 4 torch threads
    ("auto", True, 2, 0, 1),      # never fewer than one
    ("0", True, 16, 0, 0),
    ("3", False, 2, 0, 3),
])
def test_api_process_count(setting: str, cuda: bool, cores: int, threads: int, expected: int) -> None:
    s = Settings(api_processes=setting, torch_threads=threads)
    assert s.api_process_count(cuda, cores) == expected


def test_the_model_takes_the_cores_the_api_processes_leave_on_the_cpu() -> None:
    assert Settings().model_threads_beside(1, cuda=False, cores=2).torch_threads == 1
    assert Settings().model_threads_beside(3, cuda=False, cores=16).torch_threads == 13
    assert Settings(torch_threads=2).model_threads_beside(1, cuda=False, cores=2).torch_threads == 2  # as set
    assert Settings().model_threads_beside(14, cuda=True, cores=16).torch_threads == 0  # a GPU: torch's default
    assert Settings().model_threads_beside(0, cuda=False, cores=2).torch_threads == 0  # one process: unchanged


def test_pixel_slots() -> None:
    """One pool for every API process: the queue, two batches running, a request on its way in each."""
    s = Settings(queue_capacity_images=256, max_images_per_request=32, max_batch_size=16)
    assert s.pool_slots(1) == 256 + 32 + 32 and s.pool_slots(3) == 256 + 32 + 3 * 32
    assert Settings(pixel_slots=7).pool_slots(4) == 7


@pytest.mark.parametrize("bad", ["-1", "two", "1.5", ""])
def test_api_processes_must_be_auto_or_a_count(bad: str) -> None:
    with pytest.raises(ValidationError):
        Settings(api_processes=bad)
