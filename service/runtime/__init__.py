"""The runtime: the engine that owns the model, CUDA graphs, the cost model, the batching policy, the worker's
queues (admission), its typed seams and the worker thread."""
