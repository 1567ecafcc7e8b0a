"""The Open Inference Protocol v2 over gRPC (``server.py``); the messages are generated from
``grpc_service.proto`` (``make grpc-stubs``) and checked in."""
