r"""How long a checkpoint save blocks the training loop: orbax async vs synchronous, one process, one run.

    python benchmarks/checkpoint_blocking.py                       # configs/base.py-sized TrainState, 1 device
    python benchmarks/checkpoint_blocking.py --config=configs/big.py --saves=2

The state is the trainer's own TrainState for the config (params + Adam moments + step, float32), born on one device
(the loop's view: the host pays for the copy out of device memory). Each mode first makes one untimed save (orbax
compiles its device-to-host transfers once per process), then `--saves` timed ones, each into the same
Checkpointer (keep 2, as training does):

  blocking   wall time of Checkpointer.save(): what the training loop waits for before its next step
  committed  save() until the step directory is renamed into place (wait_until_finished): the data is safe

Async mode blocks only while the arrays are copied to host memory; the write, the fsync-free rename and the deletion
of old steps run on orbax's background threads while the loop trains. The table shows medians over the saves.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app
from absl import flags
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', 'configs/base.py', 'Config whose TrainState is saved.')
flags.DEFINE_integer('saves', 3, 'Timed saves per mode (after one untimed warm-up save).')
flags.DEFINE_string('dir', None, 'Where to write (default: a temporary directory, deleted afterwards).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  from flax import linen as nn
  from transformer_jax.training import checkpoint as checkpoint_lib
  from transformer_jax.training import optim
  from transformer_jax import parallel
  from transformer_jax.training import train_state
  from transformer_jax.model.transformer import Transformer

  config = FLAGS.config
  config.unlock()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  device = jax.devices()[0]
  mesh = parallel.make_mesh(config.mesh, devices=[device])
  model = Transformer(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    state, _ = train_state.create_sharded_state(model, tx, config, mesh, jax.random.key(0))
    jax.block_until_ready(state)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  params = train_state.count_params(state.params)

  root = FLAGS.dir or tempfile.mkdtemp(prefix='checkpoint_blocking_')
  rows = []
  try:
    for mode, async_save in (('async', True), ('sync', False)):
      workdir = os.path.join(root, mode)
      shutil.rmtree(workdir, ignore_errors=True)
      checkpointer = checkpoint_lib.Checkpointer(workdir, keep=2, async_save=async_save)
      blocking, committed = [], []
      for step in range(FLAGS.saves + 1):
        start = time.perf_counter()
        checkpointer.save(step, state, {'step': step}, {'benchmark': True})
        blocked = time.perf_counter() - start
        checkpointer.wait()
        done = time.perf_counter() - start
        if step:  # step 0 is the warm-up
          blocking.append(blocked)
          committed.append(done)
      checkpointer.close()
      rows.append((mode, statistics.median(blocking), statistics.median(committed), blocking))
      shutil.rmtree(workdir, ignore_errors=True)
  finally:
    if not FLAGS.dir:
      shutil.rmtree(root, ignore_errors=True)

  print(f'command: python {" ".join(sys.argv)}')
  print(
    f'device: {device.device_kind} ({jax.default_backend()}), {os.cpu_count()} CPUs, {platform.node()}; '
    f'load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}; {time.strftime("%Y-%m-%d")}'
  )
  print(
    f'state: {params:,} parameters; TrainState {nbytes / 2**20:.0f} MiB (params + Adam moments, float32); '
    f'written under {root}'
  )
  print()
  print('| mode  | save() blocks the loop (s) | until committed (s) | blocking, each save (s) |')
  print('|-------|----------------------------|---------------------|-------------------------|')
  for mode, block, commit, each in rows:
    print(f'| {mode:5} | {block:26.3f} | {commit:19.3f} | {", ".join(f"{x:.3f}" for x in each):23} |')
  ratio = rows[1][1] / max(rows[0][1], 1e-9)
  print(f'\nasync blocks the loop {ratio:.1f}x less than sync ({rows[0][1]:.3f} s vs {rows[1][1]:.3f} s per save)')


if __name__ == '__main__':
  app.run(main)
