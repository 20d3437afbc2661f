"""One module per stage of an iteration: pure functions from tables, models and config to tables and
metrics. None of them touches storage; rlme_pipeline.jobs.train reads their inputs and writes their outputs."""
