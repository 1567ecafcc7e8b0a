"""The runtime: the engine that owns the model, CUDA graphs, the cost model, the batching policy and worker."""
