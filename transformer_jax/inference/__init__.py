"""Inference: decoding, sampling, held-out evaluation, scores and attention maps over a trained workdir."""
