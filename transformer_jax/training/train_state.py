"""The TrainState and how it is built: the model's config from a run config, the state born sharded on a mesh, and
its abstract shape (for restores) without allocating anything. train.py steps it; workdir.py and checkpoint.py
store and restore it."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax import parallel
from transformer_jax.model.transformer import ModelConfig


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def model_config(config, platform: str | None = None, **overrides) -> ModelConfig:
  """The model's config; `platform` ('tpu', 'gpu', 'cpu'; default this process's backend) resolves
  model.dtype='auto' for the chip the step will run on."""
  return ModelConfig.from_config(
    config.model,
    platform=platform,
    max_len=max(config.max_length, config.packed_inputs_length, config.packed_targets_length),
    **overrides,
  )


def dummy_batch(config, rows: int = 1):
  """A batch of the shapes the model takes (keyword arguments of its __call__): a language model has no inputs."""
  targets = {'targets': jnp.ones((rows, config.packed_targets_length), jnp.int32)}
  if config.model.get('kind', 'encoder_decoder') == 'decoder':
    return targets
  return {'inputs': jnp.ones((rows, config.packed_inputs_length), jnp.int32), **targets}


def init_boxed_state(model: nn.Module, tx, config, rng) -> TrainState:
  """Parameters still wrapped in their logical-axis boxes; optax's moments inherit the boxes (same names)."""
  batch = dummy_batch(config)
  params = model.init({'params': rng}, **batch)['params']
  return TrainState(step=jnp.array(0, jnp.int32), params=params, opt_state=tx.init(params))


def state_logical_specs(model: nn.Module, tx, config):
  """PartitionSpecs over logical axis names for every leaf of the TrainState, without allocating anything."""
  abstract = jax.eval_shape(functools.partial(init_boxed_state, model, tx, config), jax.random.key(0))
  return nn.get_partition_spec(abstract)


def create_sharded_state(model: nn.Module, tx, config, mesh, rng) -> tuple[TrainState, Any]:
  """The state is born sharded (jit with out_shardings): never whole on one device or host."""
  shardings = parallel.logical_shardings(state_logical_specs(model, tx, config), mesh)
  init = jax.jit(lambda r: nn.meta.unbox(init_boxed_state(model, tx, config, r)), out_shardings=shardings)
  return init(rng), shardings


def abstract_state(model: nn.Module, tx, config, shardings) -> TrainState:
  unboxed = jax.eval_shape(lambda: nn.meta.unbox(init_boxed_state(model, tx, config, jax.random.key(0))))
  return checkpoint_lib.abstract_with_shardings(unboxed, shardings)


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
