"""Worker processes and their gRPC services (``worker.proto``), and the frontend over them."""
