"""Keel's feedback DAG for Airflow, `keel_feedback`, built in keel/orchestration/feedback.py (schedule,
parameters, tasks, the zones' dataset assets), so this file stays a declaration: nothing heavy is imported
while Airflow parses it.
"""

from __future__ import annotations

from keel.orchestration.feedback import build_dag
from keel.settings import get_settings

build_dag(get_settings())
