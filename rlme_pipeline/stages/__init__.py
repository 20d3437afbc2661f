"""One module per stage of an iteration; each reads its inputs from the run and returns a StageRecord."""
