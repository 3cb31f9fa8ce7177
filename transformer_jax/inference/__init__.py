"""Inference: a trained run opened for reading, decoding, sampling, held-out evaluation, scores and attention maps."""
