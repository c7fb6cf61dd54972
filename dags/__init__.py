"""Airflow 3 DAG files: thin, asset-based declarations; the logic lives in keel/ and ray_jobs/."""
