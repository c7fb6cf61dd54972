"""Traces: built after the work they describe is over, from the timings it kept, and sent over OTLP
(to MLflow Tracing by default). Ids, counts, timings and hashes only: a trace never carries text."""
