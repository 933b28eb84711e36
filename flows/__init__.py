"""Prefect flows: drive the DVC stages (they know stages only through dvc.yaml)."""
