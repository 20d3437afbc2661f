"""`rlme evolve`: meta-questions that evolve, an MPO-style meta-evaluator over a run's stored rollouts
(docs/evolve.md). evidence -> propose -> edits (parse) -> rank (measure, choose) -> proposal (the record)."""
