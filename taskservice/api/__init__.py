"""The wire side of tasks.v1.TaskService: the call pipeline every call passes
through (admission, auth, access line, stream pump), the servicer, conversion
between protobuf and domain values, error statuses, health, reflection and the
WatchTasks streams. Protobuf stops here: the stores see domain dataclasses."""
