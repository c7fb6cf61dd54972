"""Keel: a production anatomy for AI systems on Airflow 3, Ray Serve, Presidio and MLflow."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("keel")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"
