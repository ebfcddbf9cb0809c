"""What the service tells its operators: JSON log lines, the caller's trace
context, and OpenTelemetry metrics and spans. Used by the api and the stores,
so it imports neither."""
