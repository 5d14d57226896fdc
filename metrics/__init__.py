"""trackfleet metrics: Prometheus exporters and performance analysis."""
