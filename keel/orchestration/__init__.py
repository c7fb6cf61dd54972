"""Glue between Airflow and Ray: submit Keel's Ray jobs from DAG tasks, classify and alert on failure."""
