"""TensorFlow, imported only where the input needs it (TFDS datasets), with its view of accelerators hidden: it is
an input library here and must not take GPU memory from JAX.

Importing TensorFlow costs seconds of CPU, so the default job (the generated task), `text:DIR` datasets and every
command that does not read TFDS never import it (the cost is measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

from absl import logging


@functools.cache
def tensorflow():
  """The `tensorflow` module, GPUs hidden from it (once per process)."""
  import tensorflow as tf

  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as e:  # devices already initialised; then they were hidden before
    logging.warning("tf.config.set_visible_devices([], 'GPU') failed: %s", e)
  return tf


def tensorflow_datasets():
  """The `tensorflow_datasets` module, after tensorflow() (TFDS imports TensorFlow itself)."""
  tensorflow()
  import tensorflow_datasets as tfds

  return tfds
