"""The model: the Transformer and language model in Flax Linen, attention, their config and special ids."""
