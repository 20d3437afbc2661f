"""The jobs rlme runs (train, rescore, evolve, audit), each one loop with two hooks, and what runs around them."""
