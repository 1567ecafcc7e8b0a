"""One router per resource: classify, explain, health (healthz/readyz), models, metrics."""
