"""The bucket grid's defaults: one home for the method (``LifeViT.bucket_grid``, ``patchlife eval``)
and the service (``service/settings.py`` takes them as its ``PATCHLIFE_BUCKET*`` defaults).

Torch-free, so the settings load without the ML stack.
"""

from __future__ import annotations

GRID_SIZE = 8                         # points fitted to the model's budgets (PATCHLIFE_BUCKETS)
GRID_KEEP_RATES = (0.5, 0.7, 0.9)     # keep rates whose budgets the grid is fitted to, besides the model's own
GRID_STEP = 4                         # per-stage step for checkpoints without a calibration sample
