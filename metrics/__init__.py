"""trackfleet metrics: Prometheus exporters and performance analysis.

- :mod:`metrics.broker`: the broker's exporter (events, queue, latency, per-stage and per-worker timing);
- :mod:`metrics.worker`: a worker process's exporter (batches, busy time, reconnects);
- :mod:`metrics.gpu` and ``python -m metrics``: the node GPU exporter (NVML);
- :mod:`metrics.perf`: ``trackfleet perf``, perf_analyzer-style sweeps, and :mod:`metrics.perf_plots`.

The exporters import prometheus_client and the broker's / worker's hook definitions only, never ``kernels``;
this package imports nothing at import time. See docs/metrics.md.
"""
