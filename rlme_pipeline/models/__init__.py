"""Models: references and loading, checkpoints, LoRA adapters, the tiny offline models, which weights play which role at an iteration."""
