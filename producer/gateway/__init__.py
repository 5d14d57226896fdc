"""A KServe v2 gateway in front of the broker, for Triton's clients (tritonclient) and perf_analyzer.

One model (default name ``trackfleet``) whose inputs carry one event's cells and whose outputs carry its
tracks (:mod:`producer.gateway.model`); each inference request becomes one event submitted to the
broker, like any producer's. HTTP (REST with the binary tensor extension) and gRPC
(``inference.GRPCInferenceService``) serve the same :class:`~producer.gateway.service.Gateway`;
statistics follow KServe's ``statistics`` extension with the fleet's own timings, and the metrics port
exports Triton's GPU gauges. gRPC needs the ``triton`` extra (grpcio, tritonclient); it is imported only
when the gateway starts. See docs/gateway.md.
"""
