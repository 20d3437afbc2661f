"""Audit of reward datasets: what each evaluator said, which question drove the reward, where score sets
disagree, whether the judge can be hacked. Every table is computed from lazy polars scans."""
