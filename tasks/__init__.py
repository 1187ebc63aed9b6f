"""Prefect tasks: thin wrappers that add a nested MLflow run, logging and retries around one
library call each."""
