"""Prefect flows: the order of the stages, wiring only."""
