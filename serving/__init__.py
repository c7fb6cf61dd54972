"""Keel's model layer: the Ray Serve gateway (OpenAI-compatible), its model targets and failover."""
