"""Keel's batch DAGs for Airflow, built from the chain declared in keel/orchestration/chain.py
(which DAGs, their schedules, assets and task ids), so this file stays a declaration: nothing
heavy is imported or read while Airflow parses it.
"""

from __future__ import annotations

from keel.orchestration.stages import build_dags
from keel.settings import get_settings

build_dags(get_settings())
