"""Prefect tasks: what a flow's steps and fanned-out pieces run as. A task takes URIs, names, configs and
small records and returns small records: never a model or a table (Prefect would hash or pickle them)."""
