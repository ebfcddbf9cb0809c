"""The TaskService benchmark harness: `python -m bench [--quick]`."""
