"""`transformer-jax info`: architecture, parameter count from the parameter tree itself, mesh and memory plan.

Nothing is allocated: shapes come from jax.eval_shape of init, shardings from the logical-axis rules, so the plan
for a 256-device pod slice can be printed on a laptop (--num_devices).
"""

from __future__ import annotations

import collections
import math

import jax
import numpy as np
from flax import linen as nn

from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.training import train_state
from transformer_jax.model.transformer import build_model


def _bytes(leaf) -> int:
  return int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def _per_device_bytes(leaf, mesh_axes, sizes: dict[str, int]) -> int:
  """Bytes of the largest shard of `leaf` under PartitionSpec `mesh_axes` (of mesh axis names)."""
  shard = list(leaf.shape)
  for dim, axes in enumerate(tuple(mesh_axes) + (None,) * (len(leaf.shape) - len(tuple(mesh_axes)))):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else axes
    shard[dim] = math.ceil(shard[dim] / math.prod(sizes[a] for a in axes))
  return int(np.prod(shard)) * np.dtype(leaf.dtype).itemsize


def memory_plan(config, num_devices: int):
  """(abstract state, {leaf path: (logical spec, mesh spec)}, total bytes, per-device bytes) for params+optimizer."""
  model = build_model(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  logical = train_state.state_logical_specs(model, tx, config)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(train_state.init_boxed_state(model, tx, config, jax.random.key(0))))
  sizes = dict(zip(parallel.MESH_AXES, parallel.mesh_shape(config.mesh, num_devices)))
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  rows, total, per_device = [], 0, 0
  for (path, leaf), spec in zip(leaves, specs):
    mesh_axes = nn.logical_to_mesh_axes(tuple(spec), parallel.LOGICAL_AXIS_RULES) if spec else ()
    total += _bytes(leaf)
    per_device += _per_device_bytes(leaf, mesh_axes, sizes)
    rows.append((jax.tree_util.keystr(path), tuple(leaf.shape), tuple(spec), tuple(mesh_axes)))
  return abstract, rows, sizes, total, per_device


def print_info(config, num_devices: int | None = None) -> int:
  num_devices = num_devices or jax.device_count()
  abstract, rows, sizes, total, per_device = memory_plan(config, num_devices)
  params = train_state.count_params(abstract.params)
  m = config.model
  kind = (
    'decoder-only language model, N={n} layers'
    if m.get('kind') == 'decoder'
    else 'encoder-decoder Transformer, N={n} layers each side'
  ).format(n=m.num_layers)
  print(
    f'architecture: {kind}, d_model={m.d_model}, '
    f'd_ff={m.d_ff}, h={m.num_heads}, vocab={m.vocab_size}, shared embeddings={m.share_embeddings}, '
    f'{"pre" if m.pre_norm else "post"}-norm, {m.positional} positions, compute dtype {m.dtype}'
  )
  dcn = int(config.mesh.get('dcn_data', 1))
  print(
    f'mesh ({num_devices} devices): '
    + ' '.join(f'{k}={v}' for k, v in sizes.items())
    + (f' (data spans {dcn} slices/hosts over DCN)' if dcn > 1 else '')
  )
  batch_shards = sizes['data'] * sizes['fsdp']
  print(
    f'batch: {config.batch_size} rows over {parallel.BATCH_AXES} = {batch_shards} shards of '
    f'{config.batch_size / batch_shards:g} rows (replicated over tensor={sizes["tensor"]}); rules: '
    + ', '.join(
      f'{name}->{axis}' for name, axis in parallel.LOGICAL_AXIS_RULES if axis and not name.startswith('activation')
    )
  )
  by_spec = collections.Counter()
  for path, shape, logical_spec, mesh_axes in rows:
    if path.startswith('.params'):
      by_spec[(logical_spec, mesh_axes)] += 1
  print('parameter shardings (logical axes -> mesh axes: count):')
  for (logical_spec, mesh_axes), n in sorted(by_spec.items(), key=str):
    print(f'  {logical_spec} -> {mesh_axes}: {n}')
  leaves = jax.tree_util.tree_leaves(abstract)
  split = collections.defaultdict(lambda: [0, 0])
  for leaf, (path, _, _, mesh_axes) in zip(leaves, rows):
    part = 'params' if path.startswith('.params') else 'optimizer'
    split[part][0] += _bytes(leaf)
    split[part][1] += _per_device_bytes(leaf, mesh_axes, sizes)
  for part in ('params', 'optimizer'):
    print(f'  {part}: total {split[part][0] / 2**20:.1f} MiB, per device {split[part][1] / 2**20:.1f} MiB')
  print(
    f'params + optimizer state: total {total / 2**20:.1f} MiB, per device {per_device / 2**20:.1f} MiB '
    f'({per_device / max(total, 1):.3f} of total)'
  )
  problems = parallel.indivisible_dims(abstract, [jax.sharding.PartitionSpec(*r[3]) for r in rows], sizes)
  if config.batch_size % batch_shards:
    problems.append(f'batch_size={config.batch_size} over data*fsdp={batch_shards} batch shards')
  for problem in problems:
    print(f'  indivisible (jit will refuse this mesh): {problem}')
  print(f'params={params}')
  return params
