"""The worker's modules load without the model, and the names the rest of the code imports from
``service.runtime.worker`` (and ``Timing`` from the engine) are the ones their home modules define."""

from __future__ import annotations

import subprocess
import sys

from service.runtime import costmodel, engine, seams, worker

REPO = __file__.rsplit("/tests/", 1)[0]


def test_the_worker_loads_without_the_model() -> None:
    """Only the grid's torch-free defaults (``model/defaults.py``, through the settings) of model/."""
    code = ("import sys, service.runtime.worker; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'timm', 'torchvision', 'PIL')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['model', 'model.defaults']", out.stdout


def test_re_exports_are_the_home_modules_names() -> None:
    assert worker.WorkerHooks is seams.WorkerHooks and worker.ModelEngine is seams.ModelEngine
    assert engine.Timing is costmodel.Timing
    public = {"DEVICE_OOM", "ModelEngine", "Worker", "WorkerHooks", "set_torch_threads"}
    assert set(worker.__all__) == public and all(hasattr(worker, name) for name in public)
