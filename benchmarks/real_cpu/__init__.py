"""Evidence with a real pretrained model on a CPU (SmolLM2-135M-Instruct): see __main__.py."""
