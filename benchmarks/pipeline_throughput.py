r"""Input pipeline alone vs training: batches/s of the training stream against steps/s of the train step.

    python benchmarks/pipeline_throughput.py                      # configs/tiny.py: the default generated task

Builds the config's data exactly as training does (data/pipeline.build_datasets: prepare the token-id shards in
--workdir once, then data/stream.TrainStream over them), prints the packing efficiency of the first chunk, then, on a
second stream over the same shards with its prefetch thread off (nothing else runs while these are timed):

  1. the cost of one chunk (gather its examples from the memmapped shards and pack them: the prefetch thread's work,
     median of --pack_reps chunks), also per batch;
  2. next() batches/s: gather, pack and cut batches, serially;
  3. the same next() plus parallel.global_batch (the host -> device transfer training does);
  4. train steps/s: the config's jitted train step on the mesh, on a batch from the stream (median of --steps,
     after compile and warm-up), through benchmarks/train_throughput.run_variant (MFU beside it).

Headroom = pipeline batches/s (3., all serial) / train steps/s; the goal is >= 5x. In training the prefetch thread
produces batches while the device steps, but on a CPU host the pipeline and the step share the same cores, so the
headroom is what the step can lose to input work, not a guarantee that none is lost.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file(
    'config', os.path.join(_REPO, 'configs', 'tiny.py'), 'Python config file; override keys with --config.key=value.'
  )
  flags.DEFINE_string('workdir', None, 'Prepared shards and tokenizer (default runs/bench_pipeline).')
  flags.DEFINE_integer('pack_reps', 3, 'Chunks gathered and packed (timed, median) for the per-chunk cost.')
  flags.DEFINE_integer('batches', 300, 'Timed next() calls, without and with the host -> device transfer.')
  flags.DEFINE_integer('steps', 10, 'Timed train steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed train steps after compilation.')


def iterate(stream, num_batches: int, transform=None) -> dict[str, float]:
  """Times `num_batches` next() calls (each followed by `transform`, e.g. a device transfer)."""
  epoch0 = stream.position[0]
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(stream)
    if transform is not None:
      transform(batch)
  seconds = time.perf_counter() - start
  return {
    'batches': num_batches,
    'seconds': seconds,
    'batches_per_s': num_batches / max(seconds, 1e-12),
    'epochs': stream.position[0] - epoch0,
  }


def main(argv):
  del argv
  import jax
  from benchmarks import train_throughput
  from transformer_jax import parallel
  from transformer_jax.data import pipeline
  from transformer_jax.data import stream as stream_lib

  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(_REPO, 'runs', 'bench_pipeline')
  print('# command: python ' + ' '.join([os.path.relpath(sys.argv[0], os.getcwd())] + sys.argv[1:]))
  print(
    f'# device: {jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}, '
    f'{time.strftime("%Y-%m-%d %H:%M")}, os.cpu_count()={os.cpu_count()}',
    flush=True,
  )
  start = time.perf_counter()
  data = pipeline.build_datasets(config, workdir)
  build_s = time.perf_counter() - start
  train = data.train
  rows_per_batch = train.rows_per_chunk_0 / train.batch_size
  print(
    f'# build_datasets: {build_s:.1f} s; {train.num_examples} examples in {train.chunks_per_epoch} chunks of '
    f'{train.chunk_examples}; the first chunk packs into {train.rows_per_chunk_0} rows of '
    f'{train.inputs_length}/{train.targets_length} tokens ({rows_per_batch:.1f} batches of {train.batch_size} rows)',
    flush=True,
  )

  # 1. host: gathering and packing chunks (the prefetch thread's work), on a stream without that thread.
  fresh = stream_lib.TrainStream(
    train.shards,
    batch_size=train.batch_size,
    inputs_length=train.inputs_length,
    targets_length=train.targets_length,
    seed=train.seed,
    chunk_examples=train.chunk_examples,
    max_open_rows=train.max_open_rows,
    prefetch=0,
  )
  pack_times, chunk_rows = [], []
  for rep in range(1, FLAGS.pack_reps + 1):  # chunk 0 of epoch 0 is packed (and cached) by the constructor
    epoch, chunk = divmod(rep, fresh.chunks_per_epoch)
    start = time.perf_counter()
    rows = fresh.chunk_rows(epoch, chunk)
    pack_times.append(time.perf_counter() - start)
    chunk_rows.append(rows['inputs'].shape[0])
  pack_s = statistics.median(pack_times)
  pack_batch_s = pack_s * train.batch_size / statistics.median(chunk_rows)
  # 2. next(), serially: gather + pack + cut batches
  host = iterate(fresh, FLAGS.batches)
  # 3. + the host -> device transfer training does
  mesh = parallel.make_mesh(config.mesh)
  device = iterate(fresh, FLAGS.batches, transform=lambda b: jax.block_until_ready(parallel.global_batch(b, mesh)))

  # 4. the train step on the stream's own batch
  batch = next(train)
  train.close()
  result = train_throughput.run_variant(
    'train step', config, batch, steps=FLAGS.steps, warmup=FLAGS.warmup, peak_size=0, peak_reps=1, mesh=mesh
  )
  steps_per_s = 1.0 / result.step_s

  rows = [
    '| quantity | value |',
    '|---|---|',
    f'| packing efficiency: real target slots (first chunk) | **{train.packing_efficiency:.3f}** |',
    f'| real input slots (first chunk) | {train.inputs_efficiency:.3f} |',
    f'| examples per epoch / chunks per epoch | {train.num_examples} / {train.chunks_per_epoch} |',
    f'| gather + pack one chunk ({train.chunk_examples} examples -> ~{statistics.median(chunk_rows)} rows; median of '
    f'{FLAGS.pack_reps}) | {pack_s:.2f} s ({pack_batch_s * 1e3:.2f} ms per batch of {train.batch_size} rows) |',
    f'| batches/s of next() (gather, pack, cut; serial) | {host["batches_per_s"]:,.0f} |',
    f'| batches/s of next() + global_batch (host -> device) | **{device["batches_per_s"]:,.0f}** |',
    f'| train steps/s (median of {FLAGS.steps}; step {result.step_s * 1e3:.1f} ms, MFU {result.mfu:.1%}) | '
    f'{steps_per_s:.2f} |',
    f'| **headroom: pipeline (next() + transfer) / train steps** | **{device["batches_per_s"] / steps_per_s:,.1f}x** |',
  ]
  print()
  print('\n'.join(rows))


if __name__ == '__main__':
  define_flags()
  app.run(main)
