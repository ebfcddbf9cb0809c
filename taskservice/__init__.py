"""TaskService: the tasks.v1.TaskService gRPC server and its stores."""

__version__ = "1.0.0"
