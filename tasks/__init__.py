"""Prefect tasks: one per stage. They take a config and a run URL, never model objects or tables."""
