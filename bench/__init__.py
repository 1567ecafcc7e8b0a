"""Offline tools that measure the service and the model from outside: load tests, benches, the GPU check."""
