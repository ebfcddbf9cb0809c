"""The running process: the gRPC server that wires config, store, call pipeline
and servicer together, the supervisor that runs several worker processes on
one port, and the port checks both make before binding."""
