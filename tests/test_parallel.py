"""One sharded train step: every mesh of 8 simulated CPU devices gives the 1-device loss and parameters, and the
parameters really are split the way LOGICAL_AXIS_RULES says. Also mesh/batch/start-up helpers and the memory plan."""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from configs import big, tiny
from transformer_jax import info
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.training import train as train_lib
from transformer_jax.training import train_state
from transformer_jax.model.transformer import build_model

NUM_STEPS = 3
GLOBAL_ROWS = 16
# float32: sums over differently split batches/parameters round differently, and Adam's first steps move a weight
# by up to lr (3e-3) whatever its gradient's size, so a rounding difference can move it by ~1e-5 (seen with XLA:CPU at
# optimization level 0); a sharding bug moves it by ~lr.
RTOL, ATOL = 1e-5, 1e-5


def small_config(mesh=(1, 1, 1), dcn_data=1):
  """A model whose sharded sizes (d_model, heads, d_ff, vocab, batch rows) divide by 8; dropout 0: deterministic."""
  config = tiny.get_config()
  config.model.update(vocab_size=64, num_layers=1, d_model=32, num_heads=8, d_ff=64, dropout_rate=0.0)
  config.max_length = 8
  config.packed_inputs_length = 16
  config.packed_targets_length = 8
  config.batch_size = GLOBAL_ROWS
  config.lr_schedule = 'constant'
  config.learning_rate = 3e-3
  config.mesh = ml_collections.ConfigDict(dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], dcn_data=dcn_data))
  return config


def _packed_side(rng, rows, length, vocab):
  """Two packed examples per row, then padding: tokens, segmentation (0 = pad) and positions restarting per example."""
  tokens = np.zeros((rows, length), np.int32)
  segmentation = np.zeros((rows, length), np.int32)
  position = np.zeros((rows, length), np.int32)
  for r in range(rows):
    a = int(rng.integers(2, length // 2 + 1))
    b = int(rng.integers(1, length - a + 1))
    for seg, (lo, hi) in enumerate(((0, a), (a, a + b)), start=1):
      tokens[r, lo:hi] = rng.integers(4, vocab, hi - lo)
      segmentation[r, lo:hi] = seg
      position[r, lo:hi] = np.arange(hi - lo)
  return tokens, segmentation, position


def synthetic_batches(config, num=NUM_STEPS, seed=0):
  """Global batches (numpy), the same on every process."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    batch = {}
    for side, length in (('inputs', config.packed_inputs_length), ('targets', config.packed_targets_length)):
      tok, seg, pos = _packed_side(rng, config.batch_size, length, config.model.vocab_size)
      batch.update({side: tok, f'{side}_segmentation': seg, f'{side}_position': pos})
    out.append(batch)
  return out


def run_steps(config, mesh, batches):
  """create_sharded_state + jit_train_step on `mesh`; returns (losses, initial host params, final state).

  Each process feeds only the rows of each global batch that its devices hold (parallel.process_batch_rows).
  """
  model = build_model(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  losses = []
  rows = parallel.process_batch_rows(mesh, config.batch_size)
  local = lambda batch: {k: v[rows] for k, v in batch.items()}
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    state, shardings = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(config.seed))
    initial = host_params(state.params)  # before the first step donates the state
    step = train_lib.jit_train_step(model, tx, config, mesh, shardings)
    for batch in batches:
      state, metrics = step(state, parallel.global_batch(local(batch), mesh), jax.random.key(1))
      losses.append(float(metrics['loss']))
  return losses, initial, state


def host_params(params):
  """Whole parameter arrays on this host (gathered across processes when there are several)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    params = multihost_utils.process_allgather(params, tiled=True)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def assert_params_close(got, want):
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


@functools.cache
def mesh_run(shape=(1, 1, 1)):
  """(losses, final host params, initial host params, final state) of NUM_STEPS steps on a mesh of this process's
  devices; (1, 1, 1) is the single-device reference. Cached: test_multiprocess compares against the same runs."""
  config = small_config(shape)
  devices = jax.devices()[: int(np.prod(shape))]
  losses, initial, state = run_steps(
    config, parallel.make_mesh(config.mesh, devices=devices), synthetic_batches(config)
  )
  return losses, host_params(state.params), initial, state


def _reference():
  losses, params, initial, _ = mesh_run()
  assert max(np.abs(params[k] - initial[k]).max() for k in params) > 1e-3  # the steps really moved the weights
  return losses, params


EMBEDDING = "['shared_embedding']['embedding']"
QUERY = "['encoder']['layers_0']['self_attention']['query']['kernel']"
OUT = "['decoder']['layers_0']['cross_attention']['out']['kernel']"
FFN_IN = "['encoder']['layers_0']['feed_forward']['wi']['kernel']"
FFN_OUT = "['decoder']['layers_0']['feed_forward']['wo']['kernel']"
FFN_BIAS = "['decoder']['layers_0']['feed_forward']['wi']['bias']"
NORM = "['encoder']['layers_0']['feed_forward_norm']['scale']"

# parameter -> the mesh PartitionSpec the rules give it (vocab/heads/mlp -> tensor, embed -> fsdp)
EXPECTED_SPECS = {
  EMBEDDING: P('tensor', 'fsdp'),
  QUERY: P('fsdp', 'tensor', None),
  OUT: P('tensor', None, 'fsdp'),
  FFN_IN: P('fsdp', 'tensor'),
  FFN_OUT: P('tensor', 'fsdp'),
  FFN_BIAS: P('tensor'),
  NORM: P('fsdp'),
}


def _by_path(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('shape', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_sharded_steps_match_one_device(shape):
  ref_losses, ref_params = _reference()
  losses, params, _, state = mesh_run(shape)
  mesh = state.params['shared_embedding']['embedding'].sharding.mesh
  assert dict(mesh.shape) == dict(zip(parallel.MESH_AXES, shape))

  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_params_close(params, ref_params)

  # The parameters (and Adam's moments) are split as the rules say, on the real arrays.
  params = _by_path(state.params)
  opt = _by_path(state.opt_state)
  mu = {path: next(v for k, v in opt.items() if k.endswith('.mu' + path)) for path in EXPECTED_SPECS}
  sizes = dict(mesh.shape)
  for path, spec in EXPECTED_SPECS.items():
    for tree in (params, mu):
      array = tree[path]
      assert array.sharding.spec == spec, (path, array.sharding.spec)
      shard = array.addressable_shards[0].data.shape
      expected = tuple(d // (sizes[a] if a else 1) for d, a in zip(array.shape, tuple(spec) + (None,) * 3))
      assert shard == expected, (path, shard, expected)
  # and a parameter split over both fsdp and tensor holds 1/(fsdp*tensor) of it on each device
  embedding = params[EMBEDDING]
  assert embedding.addressable_shards[0].data.size * sizes['fsdp'] * sizes['tensor'] == embedding.size


def test_the_comparison_can_fail():
  """One device's shard off by 1e-4 relative (or one step fewer) is detected at this tolerance."""
  losses, ref_params, initial, _ = mesh_run()
  wrong = dict(ref_params)
  embedding = wrong[EMBEDDING].copy()
  embedding[:8] *= 1 + 1e-4  # the first of 8 vocab shards
  wrong[EMBEDDING] = embedding
  with pytest.raises(AssertionError):
    assert_params_close(wrong, ref_params)
  with pytest.raises(AssertionError):
    assert_params_close(initial, ref_params)
  with pytest.raises(AssertionError):
    np.testing.assert_allclose(losses[:-1] + [losses[-1] * (1 + 1e-4)], losses, rtol=RTOL)


def test_global_batch_rows_land_on_their_devices():
  config = small_config((2, 2, 2))
  mesh = parallel.make_mesh(config.mesh)
  rows = parallel.process_batch_rows(mesh, GLOBAL_ROWS)
  np.testing.assert_array_equal(rows, np.arange(GLOBAL_ROWS))  # one process holds every row
  local = {'inputs': np.arange(GLOBAL_ROWS * 3, dtype=np.int32).reshape(GLOBAL_ROWS, 3)}
  batch = parallel.global_batch(local, mesh)['inputs']
  assert batch.shape == (GLOBAL_ROWS, 3)
  assert batch.sharding.spec == P(('data', 'fsdp'))
  for shard in batch.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), local['inputs'][shard.index])
    assert shard.data.shape == (GLOBAL_ROWS // 4, 3)  # split 4 ways over data*fsdp, replicated over tensor


@pytest.mark.parametrize(
  'sizes,devices,expected',
  [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=8, tensor=2), 16, (1, 8, 2)),
  ],
)
def test_mesh_shape(sizes, devices, expected):
  assert parallel.mesh_shape(sizes, devices) == expected


@pytest.mark.parametrize(
  'sizes,devices',
  [
    (dict(data=-1, fsdp=-1, tensor=1), 8),
    (dict(data=3, fsdp=1, tensor=1), 8),
    (dict(data=-1, fsdp=3, tensor=1), 8),
    (dict(data=0, fsdp=1, tensor=1), 8),
  ],
)
def test_mesh_shape_errors(sizes, devices):
  with pytest.raises(ValueError):
    parallel.mesh_shape(sizes, devices)


class _FakeDevice:
  """Enough of a device for mesh_utils' hybrid layout (processes as granules)."""

  platform = 'cpu'
  device_kind = 'cpu'

  def __init__(self, i, process):
    self.id, self.process_index = i, process

  def __repr__(self):
    return f'D{self.id}@p{self.process_index}'


def test_hybrid_mesh_keeps_fsdp_and_tensor_inside_a_granule():
  devices = [_FakeDevice(i, i // 4) for i in range(8)]  # 2 processes x 4 devices
  array = parallel.hybrid_device_array((4, 1, 2), 2, devices)
  assert array.shape == (4, 1, 2)
  processes = np.vectorize(lambda d: d.process_index)(array)
  np.testing.assert_array_equal(processes[:, 0, 0], [0, 0, 1, 1])  # data spans the two processes (DCN)
  assert (processes == processes[:, :, :1]).all()  # tensor never crosses processes
  with pytest.raises(ValueError, match='dcn_data=4'):
    parallel.hybrid_device_array((4, 1, 2), 4, devices)
  with pytest.raises(ValueError, match='multiple'):
    parallel.hybrid_device_array((3, 1, 2), 2, devices[:6])


def test_single_process_gather_helpers():
  pairs = [('a', 'b'), ('c', 'd')]
  assert parallel.gather_process_shards(pairs) == pairs
  assert parallel.max_over_processes(3) == 3
  items = list(range(11))
  assert parallel.interleave([items[p::3] for p in range(3)]) == items


@pytest.mark.parametrize(
  'env,expected',
  [
    ({}, None),
    ({'SLURM_JOB_ID': '7'}, None),  # inside an sbatch script but not in an srun step
    (
      {
        'SLURM_JOB_ID': '7',
        'SLURM_STEP_NODELIST': 'n[1-2]',
        'SLURM_NTASKS': '1',
        'SLURM_PROCID': '0',
        'SLURM_LOCALID': '0',
      },
      None,
    ),
    (
      {
        'SLURM_JOB_ID': '7',
        'SLURM_STEP_NODELIST': 'n[1-2]',
        'SLURM_NTASKS': '16',
        'SLURM_PROCID': '3',
        'SLURM_LOCALID': '3',
      },
      'slurm',
    ),
    ({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, 'tpu-hosts'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234'}, 'env'),
    ({'OMPI_COMM_WORLD_SIZE': '4'}, 'ompi'),
    ({'TRANSFORMER_JAX_DISTRIBUTED': '1'}, 'forced'),
    ({'TRANSFORMER_JAX_DISTRIBUTED': '0', 'OMPI_COMM_WORLD_SIZE': '4'}, None),
  ],
)
def test_cluster_environment(env, expected):
  assert parallel.cluster_environment(env) == expected


def test_single_local_process_does_not_initialize(monkeypatch):
  for k in (
    'SLURM_JOB_ID',
    'OMPI_COMM_WORLD_SIZE',
    'JAX_COORDINATOR_ADDRESS',
    'TPU_WORKER_HOSTNAMES',
    'TPU_PROCESS_ADDRESSES',
    'MEGASCALE_COORDINATOR_ADDRESS',
    'TRANSFORMER_JAX_DISTRIBUTED',
  ):
    monkeypatch.delenv(k, raising=False)
  assert parallel.maybe_initialize_distributed() is False
  with pytest.raises(ValueError, match='num_processes'):
    parallel.maybe_initialize_distributed('127.0.0.1:1')


def _plan(config, devices):
  _, _, _, total, per_device = info.memory_plan(config, devices)
  return total, per_device


@pytest.mark.parametrize('fsdp,tensor,devices', [(8, 1, 8), (8, 2, 16)])
def test_memory_plan_divides_by_the_sharded_axes(fsdp, tensor, devices):
  config = big.get_config()
  config.mesh.update(data=1, fsdp=fsdp, tensor=tensor)
  total, per_device = _plan(config, devices)
  # Only LayerNorm/bias vectors over heads-free axes and the step counter are not split both ways.
  assert per_device == pytest.approx(total / (fsdp * tensor), rel=0.01)
  config.mesh.update(data=devices, fsdp=1, tensor=1)
  assert _plan(config, devices)[1] == total  # pure data parallel: every device holds everything


def test_info_prints_plan_and_flags_indivisible_dims(capsys):
  config = big.get_config()
  config.mesh.update(data=1, fsdp=8, tensor=2)
  info.print_info(config, num_devices=16)
  out = capsys.readouterr().out
  assert 'mesh (16 devices): data=1 fsdp=8 tensor=2' in out
  assert "('vocab', 'embed') -> ('tensor', 'fsdp')" in out
  assert 'indivisible' not in out
  assert out.strip().splitlines()[-1] == 'params=214171648'
  config.mesh.update(data=1, fsdp=1, tensor=16)  # vocab 37000 is not a multiple of 16
  info.print_info(config, num_devices=16)
  out = capsys.readouterr().out
  assert 'indivisible' in out and 'size 37000 over 16' in out
