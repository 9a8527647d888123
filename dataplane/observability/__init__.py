"""What the data plane tells operators about the traffic it carries: Prometheus metrics (metrics.py) and
OpenTelemetry traces (tracing.py, over the pure settings, propagation and sampling modules)."""
