"""What a model is trained on: tokenization, the per-peer loss, and the evaluators that
score the averaged model and each peer's own model."""
