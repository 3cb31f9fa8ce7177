"""Device mesh, logical-axis rules and shardings, multi-host input and multi-host start-up.

Changing parallelism is changing config, not code. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel
with parameters and optimizer state sharded, ZeRO-3 style), `tensor` (Megatron-style: heads, d_ff and vocabulary
split across devices). The batch is split over (data, fsdp); each process reads only its own rows of it.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
_AXIS_TYPES = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)  # Linen's logical rules expect Auto axes

# Logical axis name (model.py) -> mesh axis. The first matching rule whose mesh axis is free wins.
LOGICAL_AXIS_RULES = (
  # parameters (and the optimizer moments, which carry the same names)
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

# ---------------------------------------------------------------------------------------------------------------------
# Mesh


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
    raise ValueError(
      f'mesh (data, fsdp, tensor)={tuple(sizes)} needs {math.prod(sizes)} devices, but {num_devices} are available'
    )
  return tuple(sizes)


def hybrid_device_array(shape: Sequence[int], dcn_data: int, devices: Sequence[Any]) -> np.ndarray:
  """[data, fsdp, tensor] devices whose data axis spans `dcn_data` granules joined by the slower network (DCN).

  A granule is a TPU slice where devices know their slice (multi-slice TPU), else a process (multi-host GPU, or
  CPU processes). Within a granule the layout is topology-aware (ICI); fsdp and tensor never cross granules.
  """
  if shape[0] % dcn_data:
    raise ValueError(f'mesh.data={shape[0]} must be a multiple of mesh.dcn_data={dcn_data}')
  slices = {getattr(d, 'slice_index', None) for d in devices}
  process_is_granule = slices == {None} or len(slices) == 1
  granules = len(slices) if not process_is_granule else len({d.process_index for d in devices})
  if granules != dcn_data:
    raise ValueError(
      f'mesh.dcn_data={dcn_data} but the devices form {granules} {"process" if process_is_granule else "slice"}(s)'
    )
  ici_shape = (shape[0] // dcn_data, shape[1], shape[2])
  return mesh_utils.create_hybrid_device_mesh(
    ici_shape, (dcn_data, 1, 1), list(devices), process_is_granule=process_is_granule
  )


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """Topology-aware mesh over `devices` (default: all); with mesh.dcn_data > 1 a hybrid mesh whose data axis
  spans slices (multi-slice TPU) or processes (multi-host GPU)."""
  if devices is None:
    # mesh.num_devices: only the first N devices of a single process (a shared machine, a quick test); 0 = all.
    limit = int(mesh_config.get('num_devices', 0) or 0)
    if limit and jax.process_count() > 1:
      raise ValueError('mesh.num_devices is for single-process runs; multi-process runs use every device')
    devices = jax.devices()[:limit] if limit else jax.devices()
  devices = list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  dcn_data = int(mesh_config.get('dcn_data', 1))
  if dcn_data > 1:
    return Mesh(hybrid_device_array(shape, dcn_data, devices), MESH_AXES, axis_types=_AXIS_TYPES)
  if len(devices) == jax.device_count():  # all devices: let JAX lay the mesh onto the physical topology
    return jax.make_mesh(shape, MESH_AXES, axis_types=_AXIS_TYPES, devices=devices)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=_AXIS_TYPES)


# ---------------------------------------------------------------------------------------------------------------------
# Shardings


def logical_shardings(logical_specs, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
  """Tree of PartitionSpecs over logical names -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def indivisible_dims(shapes, specs, axis_sizes: Mapping[str, int]) -> list[str]:
  """'path: dim i of size n over k shards' for every leaf a NamedSharding cannot split evenly (jit refuses those).

  `shapes` is a tree of objects with .shape, `specs` the matching tree of mesh-axis PartitionSpecs.
  """
  problems = []
  flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(shapes)[0], flat_specs):
    for dim, axes in enumerate(tuple(spec)):
      if axes is None:
        continue
      parts = math.prod(axis_sizes[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if leaf.shape[dim] % parts:
        problems.append(
          f'{jax.tree_util.keystr(path)}: dim {dim} of size {leaf.shape[dim]} over {parts} shards ({axes})'
        )
  return problems


# ---------------------------------------------------------------------------------------------------------------------
# Input: every process reads only its own rows


@functools.lru_cache(maxsize=64)
def process_batch_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
  """Row indices of a [global_rows, ...] batch that this process's devices hold (sorted).

  The data pipeline gives process p its own 1/process_count of every global batch; that only works when processes
  do not share batch shards, i.e. the batch axes (data*fsdp) are split at least as finely as the processes.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
  rows = np.unique(np.concatenate([np.arange(global_rows)[idx] for idx in index_map.values()]))
  if len(rows) * jax.process_count() != global_rows:
    batch_shards = mesh.shape['data'] * mesh.shape['fsdp']
    raise ValueError(
      f'each of the {jax.process_count()} processes must feed its own 1/{jax.process_count()} of the batch, but '
      f'this mesh {dict(mesh.shape)} has only data*fsdp={batch_shards} batch shards, so process '
      f'{jax.process_index()} holds {len(rows)} of {global_rows} rows: make mesh.data*mesh.fsdp a multiple of '
      f'the number of processes (tensor parallelism belongs inside a host)'
    )
  return rows


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> one global jax.Array per key (rows x process_count), sharded over the batch axes.

  No process ever holds the whole batch; rows land on this process's devices in order.
  """
  sharding = batch_sharding(mesh)
  local = {k: np.asarray(v) for k, v in local_batch.items()}
  if not local:
    return {}
  local_rows = next(iter(local.values())).shape[0]
  global_rows = local_rows * jax.process_count()
  process_batch_rows(mesh, global_rows)  # validates the layout (cached)
  return {
    k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:]) for k, v in local.items()
  }


def allgather_objects(local: Any) -> list[Any]:
  """[object of process 0, object of process 1, ...] on every process, for small JSON-able objects (e.g. the
  held-out sentence pairs). Uses the devices' collectives (multihost_utils.process_allgather) on UTF-8 bytes."""
  if jax.process_count() == 1:
    return [local]
  payload = np.frombuffer(json.dumps(local).encode('utf-8'), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int32))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[: payload.size] = payload
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(gathered[p, : sizes[p]].tobytes().decode('utf-8')) for p in range(len(sizes))]


def interleave(shards: Sequence[Sequence[Any]]) -> list[Any]:
  """Inverse of shards[p] = items[p::len(shards)] (how the data pipeline splits examples over processes)."""
  out = []
  for j in range(max((len(s) for s in shards), default=0)):
    out.extend(s[j] for s in shards if j < len(s))
  return out


def gather_process_shards(local_items: Sequence[Any]) -> list[Any]:
  """All processes' items[p::P] shards -> the whole list, in the original order, on every process."""
  if jax.process_count() == 1:
    return list(local_items)
  shards = allgather_objects([list(x) if isinstance(x, tuple) else x for x in local_items])
  return [tuple(x) if isinstance(x, list) else x for x in interleave(shards)]


def max_over_processes(value: int) -> int:
  """The largest `value` any process passed (e.g. its number of eval batches), on every process."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.array([value], np.int32))))


# ---------------------------------------------------------------------------------------------------------------------
# Multi-process start-up

HEARTBEAT_TIMEOUT_S = 100  # a process whose peer stops sending heartbeats this long aborts with an error
SHUTDOWN_TIMEOUT_S = 300  # at exit, how long a process waits for its peers to finish too
INITIALIZATION_TIMEOUT_S = 300  # how long processes wait for each other at start-up


def cluster_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """Which multi-process launcher JAX can read this process's place from, or None for a single process.

  TRANSFORMER_JAX_DISTRIBUTED=0 forces a single process; =1 forces jax.distributed's own auto-detection.
  """
  env = os.environ if environ is None else environ
  forced = env.get('TRANSFORMER_JAX_DISTRIBUTED', '').strip().lower()
  if forced in ('0', 'false', 'no', 'off'):
    return None
  if forced in ('1', 'true', 'yes', 'on'):
    return 'forced'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'  # with JAX_NUM_PROCESSES and JAX_PROCESS_ID, or a launcher JAX detects
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in env for k in slurm) and int(env['SLURM_NTASKS']) > 1:
    return 'slurm'  # inside `srun` with several tasks (a bare sbatch script or salloc shell has no step)
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'ompi'
  if env.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'tpu-multislice'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  if ',' in hosts:
    return 'tpu-hosts'
  if environ is None and _on_cloud_tpu_vm():
    return 'cloud-tpu'  # single- or multi-host: JAX reads the worker list from the VM metadata
  return None


def _on_cloud_tpu_vm() -> bool:
  try:
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))
  except ImportError:
    return False


def _env_int(name: str, default: int | None) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, '') else default


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  initialization_timeout: int | None = None,
  heartbeat_timeout_seconds: int | None = None,
  shutdown_timeout_seconds: int | None = None,
) -> bool:
  """jax.distributed.initialize when running on several processes; returns whether it did.

  Explicit arguments (the CLI's --coordinator_address/--num_processes/--process_id) win; otherwise SLURM (srun),
  Open MPI, Cloud TPU VMs and JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID) are detected. A single
  local process skips it. Failure detection: a process that stops sending heartbeats for
  heartbeat_timeout_seconds (env TRANSFORMER_JAX_HEARTBEAT_TIMEOUT_S, default 100) is declared dead and every other
  process aborts with "Terminating process because the JAX distributed service detected fatal errors"; a process
  whose collective loses a peer fails at once with a JaxRuntimeError.
  """
  environment = 'flags' if coordinator_address is not None else cluster_environment()
  if environment is None:
    return False
  if jax.distributed.is_initialized():
    return True
  if coordinator_address is None and environment == 'env':
    coordinator_address = os.environ['JAX_COORDINATOR_ADDRESS']
    num_processes = _env_int('JAX_NUM_PROCESSES', num_processes)
    process_id = _env_int('JAX_PROCESS_ID', process_id)
  if coordinator_address is not None and (num_processes is None or process_id is None):
    raise ValueError(
      'a coordinator address needs --num_processes and --process_id (or JAX_NUM_PROCESSES and JAX_PROCESS_ID)'
    )
  cpu_only = os.environ.get('JAX_PLATFORMS', '').split(',')[0].strip().lower() == 'cpu'
  if cpu_only:  # several CPU processes (tests, laptops) need a cross-process collectives implementation
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(
    initialization_timeout=initialization_timeout
    or _env_int('TRANSFORMER_JAX_INIT_TIMEOUT_S', INITIALIZATION_TIMEOUT_S),
    heartbeat_timeout_seconds=heartbeat_timeout_seconds
    or _env_int('TRANSFORMER_JAX_HEARTBEAT_TIMEOUT_S', HEARTBEAT_TIMEOUT_S),
    shutdown_timeout_seconds=shutdown_timeout_seconds
    or _env_int('TRANSFORMER_JAX_SHUTDOWN_TIMEOUT_S', SHUTDOWN_TIMEOUT_S),
  )
  accepted = inspect.signature(jax.distributed.initialize).parameters
  kwargs = {k: v for k, v in kwargs.items() if k in accepted}  # these names exist in jax 0.10.2 through 0.12
  if coordinator_address is not None:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  logging.info('jax.distributed.initialize(%s) [%s]', kwargs, environment)
  jax.distributed.initialize(**kwargs)
  logging.info(
    'process %d of %d; %d local / %d global devices',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
