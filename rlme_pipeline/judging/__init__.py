"""Judging: what the evaluators say about rollouts, and whether they can be fooled."""
