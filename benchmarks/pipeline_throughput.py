r"""Input pipeline alone vs training: batches/s of the TrainIterator against steps/s of the train step.

    python benchmarks/pipeline_throughput.py                      # configs/tiny.py: the default generated task

Builds the config's data exactly as training does (data/pipeline.build_datasets: generate or load text, train or
load the SentencePiece model in --workdir, tokenize, pack), prints the packing efficiency (real target / input slots
of epoch 0), then:

  1. the cost of packing one epoch (what the iterator's background thread does once per epoch; timed directly,
     median of --pack_reps) and the rate of next() slicing batches out of a packed epoch;
  2. the same next() plus parallel.global_batch (the host -> device transfer training does);
  3. train steps/s: the config's jitted train step on the mesh, on a batch from the pipeline (median of --steps,
     after compile and warm-up), through benchmarks/train_throughput.run_variant (MFU beside it).

Pipeline batches/s = 1 / (packing per batch + slicing per batch + transfer per batch), all serial (packing is
Python under the GIL); headroom = that / train steps/s; the goal is >= 5x. On a CPU host the
pipeline and the step share the same cores, so the headroom is what the step can lose to input work, not a
guarantee that none is lost.
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
  flags.DEFINE_string('workdir', None, 'Tokenizer / generated-text cache (default runs/bench_pipeline).')
  flags.DEFINE_integer('pack_reps', 2, 'Epochs packed (timed, median) for the per-epoch packing cost.')
  flags.DEFINE_integer('steps', 10, 'Timed train steps.')
  flags.DEFINE_integer('warmup', 2, 'Untimed train steps after compilation.')


def iterate(iterator, num_batches: int, transform=None) -> dict[str, float]:
  """Times `num_batches` next() calls (each followed by `transform`, e.g. a device transfer)."""
  epoch0 = iterator.get_state()['epoch']
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
    if transform is not None:
      transform(batch)
  seconds = time.perf_counter() - start
  return {
    'batches': num_batches,
    'seconds': seconds,
    'batches_per_s': num_batches / max(seconds, 1e-12),
    'epochs': iterator.get_state()['epoch'] - epoch0,
  }


def main(argv):
  del argv
  import jax
  from benchmarks import train_throughput
  from transformer_jax import parallel
  from transformer_jax.data import pipeline

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
  print(
    f'# build_datasets: {build_s:.1f} s; {train.num_examples} examples -> {train.rows_per_epoch_0} rows of '
    f'{train.inputs_length}/{train.targets_length} tokens, {train.batches_per_epoch} batches of '
    f'{train.batch_size} rows per epoch',
    flush=True,
  )

  # 1. host: packing one epoch (the background thread's job, once per epoch), then slicing batches out of it. A
  # fresh iterator without the background thread, so nothing else runs while these are timed.
  start = time.perf_counter()
  fresh = pipeline.TrainIterator(
    train._examples,
    batch_size=train.batch_size,
    inputs_length=train.inputs_length,
    targets_length=train.targets_length,
    seed=train.seed,
    prefetch=False,
  )  # packs epoch 0
  pack_times = [time.perf_counter() - start]
  for epoch in range(1, FLAGS.pack_reps):
    start = time.perf_counter()
    fresh._pack_epoch(epoch)
    pack_times.append(time.perf_counter() - start)
  pack_s = statistics.median(pack_times)
  slicing = iterate(fresh, min(fresh.batches_per_epoch - 1, 500))  # within epoch 0, already packed
  # 2. + the host -> device transfer training does
  mesh = parallel.make_mesh(config.mesh)
  fresh.set_state({'step': 0})
  device = iterate(
    fresh,
    min(fresh.batches_per_epoch - 1, 300),
    transform=lambda b: jax.block_until_ready(parallel.global_batch(b, mesh)),
  )

  # 3. the train step on the pipeline's own batch
  batch = next(train)
  result = train_throughput.run_variant(
    'train step', config, batch, steps=FLAGS.steps, warmup=FLAGS.warmup, peak_size=0, peak_reps=1, mesh=mesh
  )
  steps_per_s = 1.0 / result.step_s
  # per batch, serially (packing is Python under the GIL, so it does not overlap the slicing): packing amortised
  # over the epoch + slicing + transfer. In training the packing thread overlaps the device step.
  transfer_s = max(0.0, 1.0 / device['batches_per_s'] - 1.0 / slicing['batches_per_s'])
  per_batch_s = pack_s / train.batches_per_epoch + 1.0 / slicing['batches_per_s'] + transfer_s

  rows = [
    '| quantity | value |',
    '|---|---|',
    f'| packing efficiency: real target slots (epoch 0) | **{train.packing_efficiency:.3f}** |',
    f'| real input slots (epoch 0) | {train.inputs_efficiency:.3f} |',
    f'| batches per epoch ({train.batch_size} rows of {train.inputs_length}/{train.targets_length}) | '
    f'{train.batches_per_epoch} |',
    f'| pack one epoch ({train.num_examples} examples; median of {FLAGS.pack_reps}) | {pack_s:.2f} s '
    f'({pack_s / train.batches_per_epoch * 1e3:.2f} ms per batch) |',
    f'| batches/s slicing a packed epoch | {slicing["batches_per_s"]:,.0f} |',
    f'| batches/s slicing + global_batch (host -> device) | {device["batches_per_s"]:,.0f} |',
    f'| train steps/s (median of {FLAGS.steps}; step {result.step_s * 1e3:.1f} ms, MFU {result.mfu:.1%}) | '
    f'{steps_per_s:.2f} |',
    f'| pipeline batches/s, packing and transfer included | {1.0 / per_batch_s:,.0f} |',
    f'| **headroom: pipeline (packing and transfer included) / train steps** | '
    f'**{1.0 / per_batch_s / steps_per_s:,.1f}x** |',
  ]
  print()
  print('\n'.join(rows))


if __name__ == '__main__':
  define_flags()
  app.run(main)
