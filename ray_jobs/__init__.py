"""Ray job entrypoints submitted through the Ray Jobs API (ingest, scrub, validate, embed, index)."""
