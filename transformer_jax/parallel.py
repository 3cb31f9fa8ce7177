"""Device mesh, logical-axis rules and shardings: changing parallelism is changing config, not code.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer state sharded,
ZeRO-3 style), `tensor` (Megatron-style: heads, d_ff and vocabulary split across devices).
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical axis name (model.py) -> mesh axis. The first matching rule whose mesh axis is free wins.
LOGICAL_AXIS_RULES = (
    # parameters
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('mlp', 'tensor'),
    ('kv', None),
    ('layers', None),
    # activations
    ('activation_batch', BATCH_AXES),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_heads', 'tensor'),
    ('activation_kv', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves (data, fsdp, tensor) with at most one -1 (= all remaining devices)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one of mesh.data/fsdp/tensor may be -1, got {tuple(sizes)}')
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'mesh sizes must be positive or -1, got {tuple(sizes)}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices cannot be split into mesh {tuple(sizes)}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices, '
                     f'but {num_devices} are available')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  """Topology-aware mesh; with mesh.dcn_data > 1 a hybrid mesh whose data axis spans slices (multi-slice TPU)."""
  devices = jax.devices() if devices is None else devices
  dcn_data = int(mesh_config.get('dcn_data', 1))
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # Linen's logical rules expect Auto axes
  if dcn_data > 1:
    if shape[0] % dcn_data:
      raise ValueError(f'mesh.data={shape[0]} must be a multiple of mesh.dcn_data={dcn_data}')
    ici_shape = (shape[0] // dcn_data, shape[1], shape[2])
    device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, (dcn_data, 1, 1), devices)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)
  if devices is jax.devices() or len(devices) == jax.device_count():
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Tree of PartitionSpecs over logical names -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's rows -> one global jax.Array per key, sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, initialization_timeout: int = 300) -> None:
  """jax.distributed.initialize when running on several processes.

  Explicit flags win; otherwise Cloud TPU VMs and SLURM are auto-detected by JAX itself. A single local process
  (no flags, no cluster environment) skips initialisation.
  """
  explicit = coordinator_address is not None
  on_cluster = any(v in os.environ for v in ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                                             'JAX_COORDINATOR_ADDRESS'))
  if not explicit and not on_cluster:
    return
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':  # CPU-only multi-process (tests, laptops) needs gloo
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=initialization_timeout)
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  logging.info('jax.distributed.initialize(%s)', kwargs)
  jax.distributed.initialize(**kwargs)
