"""Keel's evaluation DAG for Airflow, `keel_evaluate`, built in keel/orchestration/evaluate.py (schedule,
parameters, tasks), so this file stays a declaration: nothing heavy is imported while Airflow parses it.
"""

from __future__ import annotations

from keel.orchestration.evaluate import build_dag
from keel.settings import get_settings

build_dag(get_settings())
