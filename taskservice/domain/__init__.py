"""The task domain, free of gRPC and of storage: the dataclasses, the errors
with their canonical codes, the limits, validation, the list filter, watch
changes, sealed page and resume tokens, and the backoff every retry loop uses."""
