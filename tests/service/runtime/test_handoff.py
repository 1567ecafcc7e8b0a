"""``handoff.stack_into``: the staging copy of a head batch's pixels, equal to ``torch.stack``."""

from __future__ import annotations

import pytest
import torch

from service.runtime.handoff import stack_into


def test_it_stacks_slot_views_exactly_as_torch_stack() -> None:
    g = torch.Generator().manual_seed(0)
    pool = torch.randint(0, 256, (10, 3, 8, 6), generator=g, dtype=torch.uint8)  # as a slot pool's array
    views = [pool[i] for i in (7, 0, 3, 3)] + [pool[5].transpose(1, 2).contiguous().transpose(1, 2)]  # one strided
    out = torch.full((5, 3, 8, 6), 9, dtype=torch.uint8)
    assert stack_into(views, out) is out
    assert torch.equal(out, torch.stack(views))
    before = out.clone()
    pool.zero_()  # a copy, not views: the staged pixels stay as they were
    assert torch.equal(out, before) and out.max() > 0


def test_what_numpy_cannot_copy_goes_to_torch_stack() -> None:
    floats = [torch.rand(2, 3), torch.rand(2, 3)]
    out = torch.empty(2, 2, 3, dtype=torch.float64)  # another dtype: torch.stack converts
    assert torch.equal(stack_into(floats, out), torch.stack(floats).double())
    meta = torch.empty(2, 2, 3, device="meta")
    assert stack_into([torch.empty(2, 3, device="meta")] * 2, meta).shape == (2, 2, 3)


@pytest.mark.parametrize("n", [1, 3])
def test_a_count_or_shape_that_does_not_fill_the_buffer_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match="do not fill"):
        stack_into([torch.zeros(3, 2, 2, dtype=torch.uint8)] * n, torch.empty(2, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not fill"):
        stack_into([torch.zeros(3, 2, 3, dtype=torch.uint8)] * 2, torch.empty(2, 3, 2, 2, dtype=torch.uint8))
