"""Device memory on a GPU with API processes: the model process samples the allocator into gauges
(a scrape in another process cannot read torch's counters), and an API process's scrape shows them."""

from __future__ import annotations

from pathlib import Path

import metrics_procs
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.gpu


def test_device_memory_crosses_processes(tmp_path: Path) -> None:
    ctx = metrics_procs.forkserver()
    model = metrics_procs.Child(ctx, metrics_procs.cuda_model_process, tmp_path)
    api = metrics_procs.Child(ctx, metrics_procs.api_process, tmp_path, 1, 0)
    try:
        model.ready()
        api.ready()
        text = api.ask("scrape")
    finally:
        for child in (model, api):
            if child.proc.is_alive():
                child.stop(tmp_path)
    found = {(s.name, s.labels.get("device")): s.value for f in text_string_to_metric_families(text)
             for s in f.samples if s.name.startswith("patchlife_device_memory_")}
    allocated = found[("patchlife_device_memory_allocated_bytes", "cuda:0")]
    assert allocated >= 64 << 20
    assert found[("patchlife_device_memory_reserved_bytes", "cuda:0")] >= allocated
    assert len(found) == 2  # one device, no pid label splitting it
