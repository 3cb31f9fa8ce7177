"""transformer_jax: the Transformer of "Attention Is All You Need", trained with JAX/Flax from a laptop to a pod."""

__version__ = '0.1.0'
