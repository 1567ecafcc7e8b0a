"""The hand-off between API processes and the model process: shared-memory pixel slots
(:mod:`.slots`), typed messages over a Unix socket (:mod:`.wire`), the API process's side
(:mod:`.client`, a :class:`~service.protocol.ModelClient`) and the model process's (:mod:`.host`).

Imports neither the front end nor the runtime: the host serves any ``ModelClient``.
"""
