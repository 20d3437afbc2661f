"""Prefect flows and the `rlme` command line. Composition only: the work lives in rlme_pipeline."""
