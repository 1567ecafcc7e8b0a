"""The front end: HTTP and gRPC, uploads, decoding and preprocessing, errors, schemas, the web page."""
