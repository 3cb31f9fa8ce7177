"""Two real processes on localhost (jax.distributed, gloo CPU collectives, 4 CPU devices each) train exactly like
one process with 8 devices; multi-process eval helpers agree; a process that loses its peer exits with an error.

The same file is the worker: `python tests/test_multiprocess.py <mode> <process_id> <num_processes> <port> <out>`.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import testenv

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MESHES = ((8, 1, 1), (1, 4, 2))  # pure data parallel; FSDP across the processes with tensor inside each
HEARTBEAT_S = 4


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _spawn(mode, num_processes, out_dir, extra_env=None):
  port = _free_port()
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=testenv.xla_flags(4),
    PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get('PYTHONPATH', '')]),
    PYTHONUNBUFFERED='1',
    TF_CPP_MIN_LOG_LEVEL='2',
    **(extra_env or {}),
  )
  procs = []
  for i in range(num_processes):
    log = open(os.path.join(out_dir, f'process{i}.log'), 'w')
    procs.append(
      subprocess.Popen(
        [sys.executable, __file__, mode, str(i), str(num_processes), str(port), out_dir],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    )
  return procs


def _kill(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()
  for p in procs:
    p.wait()


def _logs(out_dir, n):
  return '\n'.join(
    f'--- process {i}:\n' + open(os.path.join(out_dir, f'process{i}.log')).read()[-3000:] for i in range(n)
  )


def _wait(procs, timeout, out_dir):
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    _kill(procs)
    pytest.fail(f'workers did not finish in {timeout} s\n' + _logs(out_dir, len(procs)))
  finally:
    _kill(procs)
  codes = [p.returncode for p in procs]
  assert codes == [0] * len(procs), f'exit codes {codes}\n' + _logs(out_dir, len(procs))


# ---------------------------------------------------------------------------------------------------------------------
# Tests (parent side)


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  import test_parallel  # (the 8-device runs, cached if already computed)

  procs = _spawn('train', 2, str(tmp_path))
  try:
    # While the workers compile, compute the same runs here: one process, 8 devices.
    reference = {shape: test_parallel.mesh_run(shape) for shape in MESHES}
  except BaseException:
    _kill(procs)
    raise
  _wait(procs, timeout=600, out_dir=str(tmp_path))

  results = [json.load(open(tmp_path / f'result{i}.json')) for i in range(2)]
  for r in results:
    assert (r['process_count'], r['device_count'], r['local_device_count']) == (2, 8, 4)
  for shape in MESHES:
    key = 'x'.join(map(str, shape))
    ref_losses, ref_params = reference[shape][:2]
    for r in results:  # both processes report the same (global) loss, equal to the 1-process run's
      np.testing.assert_allclose(r['losses'][key], ref_losses, rtol=test_parallel.RTOL)
    got = dict(np.load(tmp_path / f'params_{key}.npz'))
    test_parallel.assert_params_close(got, ref_params)
    worst = max(float(np.max(np.abs(got[k] - ref_params[k]))) for k in ref_params)
    print(
      f'mesh {shape}: 2 processes losses {results[0]["losses"][key]}, 1 process {ref_losses}; '
      f'largest parameter difference {worst:.2e}'
    )
    # with fsdp across the processes each process holds only part of every parameter
    expected_fraction = 1.0 if shape[1] == 1 else 0.5
    assert [r['embedding_held_fraction'][key] for r in results] == [expected_fraction] * 2
    # each process held only its own rows of the batch
    assert sorted(sum((r['batch_rows'][key] for r in results), [])) == list(range(test_parallel.GLOBAL_ROWS))

  for r in results:
    assert r['gathered_pairs'] == r['expected_pairs']  # held-out text: all processes' shards, original order
    assert r['max_over_processes'] == 4
    # uneven eval batch counts, evened out with padding batches == the same examples evaluated as one set
    assert r['eval_batch_counts'][0] != r['eval_batch_counts'][1]
    for k, v in r['eval_split'].items():
      assert v == pytest.approx(r['eval_whole'][k], rel=1e-5), k
    assert 'make mesh.data*mesh.fsdp a multiple of the number of processes' in r['tensor_only_error']
    assert r['hybrid_processes'] == [[0], [1]]  # mesh.dcn_data=2: the data axis spans the two processes
  assert results[0]['eval_split'] == results[1]['eval_split']


def test_a_process_that_loses_its_peer_exits_with_an_error(tmp_path):
  procs = _spawn('die', 2, str(tmp_path), {'TRANSFORMER_JAX_HEARTBEAT_TIMEOUT_S': str(HEARTBEAT_S)})
  survivor, victim = procs
  try:
    deadline = time.time() + 300
    while not all(os.path.exists(tmp_path / f'ready{i}') for i in range(2)):
      assert time.time() < deadline, _logs(str(tmp_path), 2)
      assert survivor.poll() is None and victim.poll() is None, _logs(str(tmp_path), 2)
      time.sleep(0.2)
    time.sleep(1.0)  # a few collectives together
    victim.kill()
    killed = time.time()
    try:
      code = survivor.wait(timeout=HEARTBEAT_S + 90)
    except subprocess.TimeoutExpired:
      pytest.fail('the survivor kept running after its peer died\n' + _logs(str(tmp_path), 2))
    elapsed = time.time() - killed
  finally:
    _kill(procs)
  log = open(tmp_path / 'process0.log').read()
  assert code != 0, log[-3000:]
  assert 'JAX distributed service detected fatal errors' in log or 'Gloo' in log, log[-3000:]
  print(f'survivor exited with code {code} {elapsed:.1f} s after its peer was killed (heartbeat {HEARTBEAT_S} s)')


# ---------------------------------------------------------------------------------------------------------------------
# Worker side


def _worker_train(out_dir):
  import jax
  from flax import linen as nn
  import test_parallel
  from transformer_jax.inference import evaluation
  from transformer_jax import parallel
  from transformer_jax.training import train_state
  from transformer_jax.data import pipeline
  from transformer_jax.model.transformer import Transformer

  me = jax.process_index()
  result = dict(
    process_count=jax.process_count(),
    device_count=jax.device_count(),
    local_device_count=jax.local_device_count(),
    losses={},
    batch_rows={},
  )
  state = None
  for shape in MESHES:
    key = 'x'.join(map(str, shape))
    config = test_parallel.small_config(shape)
    mesh = parallel.make_mesh(config.mesh)
    result['batch_rows'][key] = parallel.process_batch_rows(mesh, config.batch_size).tolist()
    losses, _, state = test_parallel.run_steps(config, mesh, test_parallel.synthetic_batches(config))
    result['losses'][key] = losses
    embedding = state.params['shared_embedding']['embedding']
    held = np.zeros(embedding.shape, bool)
    for shard in embedding.addressable_shards:
      held[shard.index] = True
    result.setdefault('embedding_held_fraction', {})[key] = float(held.mean())
    params = test_parallel.host_params(state.params)  # a collective: every process takes part
    if me == 0:
      np.savez(os.path.join(out_dir, f'params_{key}.npz'), **params)

  # Held-out text: each process has items[p::P]; every process gets the whole list back, in order.
  pairs = [(f'Satz {k} Größe', f'ß {k} ✓') for k in range(11)]
  result['expected_pairs'] = [list(p) for p in pairs]
  result['gathered_pairs'] = [list(p) for p in parallel.gather_process_shards(pairs[me::2])]
  result['max_over_processes'] = parallel.max_over_processes(me + 3)

  # Eval loss with uneven per-process batch counts (evened out with padding batches, as train.py does) equals the
  # same examples evaluated as one set.
  config = test_parallel.small_config(MESHES[-1])
  mesh = state.params['shared_embedding']['embedding'].sharding.mesh
  rng = np.random.default_rng(7)
  examples = [
    (
      [int(t) for t in rng.integers(4, 64, rng.integers(2, 14))] + [1],
      [int(t) for t in rng.integers(4, 64, rng.integers(1, 7))] + [1],
    )
    for _ in range(40)
  ]
  lengths = dict(inputs_length=config.packed_inputs_length, targets_length=config.packed_targets_length)
  mine = examples[:30] if me == 0 else examples[30:]
  local_batches = pipeline.eval_batches(mine, batch_size=config.batch_size // 2, **lengths)
  result['eval_batch_counts'] = [int(c) for c in parallel.allgather_objects(len(local_batches))]
  count = parallel.max_over_processes(len(local_batches))
  local_batches = pipeline.eval_batches(mine, batch_size=config.batch_size // 2, num_batches=count, **lengths)
  rows = parallel.process_batch_rows(mesh, config.batch_size)
  whole = [
    {k: v[rows] for k, v in b.items()} for b in pipeline.eval_batches(examples, batch_size=config.batch_size, **lengths)
  ]
  model = Transformer(train_state.model_config(config))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    eval_step = jax.jit(evaluation.make_eval_step(model, config))
    result['eval_split'] = evaluation.evaluate_loss(eval_step, state.params, local_batches, mesh)
    result['eval_whole'] = evaluation.evaluate_loss(eval_step, state.params, whole, mesh)

  # A mesh whose batch axes are coarser than the processes: a clear error, not silently wrong data.
  try:
    parallel.process_batch_rows(parallel.make_mesh(test_parallel.small_config((1, 1, 8)).mesh), 16)
    result['tensor_only_error'] = ''
  except ValueError as e:
    result['tensor_only_error'] = str(e)

  # The hybrid (DCN) mesh: data axis across processes, the rest inside each one.
  hybrid = parallel.make_mesh(test_parallel.small_config((2, 2, 2), dcn_data=2).mesh)
  result['hybrid_processes'] = [sorted({d.process_index for d in hybrid.devices[i].flat}) for i in range(2)]

  with open(os.path.join(out_dir, f'result{me}.json'), 'w') as f:
    json.dump(result, f)


def _worker_die(out_dir):
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  mesh = Mesh(np.array(jax.devices()), ('d',))
  sharding = NamedSharding(mesh, P('d'))
  total = jax.jit(lambda x: x.sum())
  open(os.path.join(out_dir, f'ready{jax.process_index()}'), 'w').close()
  i = 0
  while True:  # collectives until a peer disappears
    x = jax.make_array_from_process_local_data(sharding, np.ones((jax.local_device_count(),), np.float32))
    assert float(total(x)) == jax.device_count()
    i += 1
    time.sleep(0.01)


def _worker_main(argv):
  mode, process_id, num_processes, port, out_dir = argv
  from transformer_jax import parallel

  assert parallel.maybe_initialize_distributed(
    f'127.0.0.1:{port}', int(num_processes), int(process_id), initialization_timeout=120
  )
  {'train': _worker_train, 'die': _worker_die}[mode](out_dir)


if __name__ == '__main__':
  _worker_main(sys.argv[1:])
