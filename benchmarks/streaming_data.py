r"""Streaming input at WMT size: preparation, time to first batch / step, stream throughput and memory.

    python /work/shared/tools/synthetic_wmt_corpus.py /tmp/wmt1m --pairs 1000000
    python benchmarks/streaming_data.py --corpus=/tmp/wmt1m --workdir=/tmp/bench_stream --small_examples=100000

Every measurement runs in its own subprocess (peak RSS from os.wait4 of that child), on configs/base.py with
--config.dataset=text:CORPUS:

  1. `transformer-jax prepare` in a fresh workdir: wall time (SentencePiece training on the config's
     tokenizer_train_sentences sample included) and peak RSS; then again (reused: manifest + sha256 check only);
  2. the stream alone (data/pipeline.build_datasets + TrainStream), for the whole corpus and for its first
     --small_examples pairs: seconds from process start to the first batch, steady real target tokens/s over
     --stream_seconds (a consumer that only counts), packing efficiency, peak RSS (must not grow with the corpus);
  3. with --train: `transformer-jax train` on the prepared workdir until checkpoint 1 is committed (= the first
     train step is done, compile included), then again on resume (until checkpoint 2); --train_model=small uses a
     1-layer d_model 64 model (the data path's share), base the full base model;
  4. with --default_task: time to the first step of configs/tiny.py (the embedded task) with this checkout and with
     the checkout in --before_repo (e.g. the main branch), fresh workdir and second run.

Prints a markdown table and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spawn(
  args: list[str], *, repo: str = _REPO, watch: str | None = None, timeout: float = 3600, log: str | None = None
) -> dict:
  """Runs a child; with `watch`, stops it (SIGKILL) once that path exists. Returns seconds, rc, peak RSS, output."""
  env = dict(os.environ, PYTHONPATH=repo, TF_CPP_MIN_LOG_LEVEL='2')
  if repo != _REPO:
    env['PYTHONDONTWRITEBYTECODE'] = '1'  # leave the other checkout exactly as it is
  out = open(log or os.devnull, 'w')
  start = time.time()
  proc = subprocess.Popen(
    args,
    cwd=repo,
    env=env,
    stdout=subprocess.PIPE if not watch else out,
    stderr=out if log else subprocess.DEVNULL,
    text=True,
  )
  seen = None
  stdout = ''
  if watch:
    while proc.poll() is None and time.time() - start < timeout:
      if os.path.exists(watch):
        seen = time.time() - start
        proc.send_signal(signal.SIGKILL)
        break
      time.sleep(0.05)
  else:
    stdout = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  out.close()
  return {
    'seconds': time.time() - start,
    'seen': seen,
    'status': status,
    'peak_rss_gb': usage.ru_maxrss / 1e6,
    'stdout': stdout,
  }


def _cli(command: str, workdir: str, config: str, overrides: list[str]) -> list[str]:
  return [
    sys.executable,
    '-m',
    'transformer_jax.cli',
    command,
    f'--config={config}',
    f'--workdir={workdir}',
    *overrides,
  ]


def _committed(workdir: str, step: int) -> str:
  return os.path.join(workdir, 'checkpoints', str(step))


# ---------------------------------------------------------------------------------------------------------------------
# The child that measures the stream


def stream_child(args) -> None:
  t0 = float(args.t0)
  sys.path.insert(0, _REPO)
  import numpy as np
  from configs import base
  from transformer_jax.data import pipeline

  config = base.get_config()
  config.dataset = f'text:{args.corpus}'
  config.max_eval_examples = 16
  if args.max_examples:
    config.max_train_examples = args.max_examples
  data = pipeline.build_datasets(config, args.workdir)
  built = time.time() - t0
  next(data.train)
  first = time.time() - t0
  tokens = rows = 0
  start = time.perf_counter()
  while time.perf_counter() - start < args.stream_seconds:
    batch = next(data.train)
    seg = batch['targets_segmentation']
    tokens += int(np.count_nonzero(seg))
    rows += seg.shape[0]
  seconds = time.perf_counter() - start
  status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines() if ':' in line)
  mem = {k: int(status[k].split()[0]) / 1e6 for k in ('RssAnon', 'RssFile', 'VmHWM') if k in status}  # GB
  print(
    json.dumps(
      {
        'mem_gb': mem,
        'build_s': built,
        'first_batch_s': first,
        'tokens_per_s': tokens / seconds,
        'rows_per_s': rows / seconds,
        'efficiency': tokens / max(rows * seg.shape[1], 1),
        'examples': data.train.total_examples,
        'first_chunk_efficiency': data.train.packing_efficiency,
      }
    )
  )


# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--corpus', required=True, help='DIR with train.{en,de} / validation.{en,de}')
  ap.add_argument('--workdir', required=True, help='scratch workdir (its data/ and spm.model are replaced)')
  ap.add_argument('--config', default=os.path.join(_REPO, 'configs', 'base.py'))
  ap.add_argument('--small_examples', type=int, default=100_000, help='the smaller corpus for the memory check')
  ap.add_argument('--stream_seconds', type=float, default=20.0)
  ap.add_argument('--train', action='store_true')
  ap.add_argument('--train_model', choices=['small', 'base'], default='small')
  ap.add_argument(
    '--train_batch_size',
    type=int,
    default=16,
    help='global rows for --train (base: 128; on CPU its [rows*256, 37000] logits alone are ~5 GB)',
  )
  ap.add_argument('--skip_stream', action='store_true')
  ap.add_argument('--default_task', action='store_true')
  ap.add_argument('--before_repo', default=None, help='checkout of the code before the change (--default_task)')
  ap.add_argument('--keep', action='store_true', help='reuse the preparation already in --workdir')
  ap.add_argument('--_stream', action='store_true', help=argparse.SUPPRESS)
  ap.add_argument('--max_examples', type=int, default=0, help=argparse.SUPPRESS)
  ap.add_argument('--t0', default='0', help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args._stream:
    stream_child(args)
    return

  rows: list[tuple[str, str]] = []
  data = [f'--config.dataset=text:{args.corpus}']
  os.makedirs(args.workdir, exist_ok=True)
  log = os.path.join(args.workdir, 'bench')
  if not args.keep:
    for name in ('data', 'spm.model', 'checkpoints'):  # a fresh preparation
      path = os.path.join(args.workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
    r = _spawn(_cli('prepare', args.workdir, args.config, data), log=log + '.prepare')
    assert r['status'] == 0, open(log + '.prepare').read()[-2000:]
    rows.append(
      (
        'prepare (fresh: tokenizer training + tokenize + write shards)',
        f'{r["seconds"]:.1f} s, peak RSS {r["peak_rss_gb"]:.2f} GB',
      )
    )
  r = _spawn(_cli('prepare', args.workdir, args.config, data), log=log + '.prepare2')
  rows.append(
    (
      'prepare again (reused: manifest + sha256 of every shard)',
      f'{r["seconds"]:.1f} s (process incl. imports), peak RSS {r["peak_rss_gb"]:.2f} GB',
    )
  )
  summary = [line for line in r['stdout'].splitlines() if line.startswith('prepared:')]
  if summary:
    rows.append(('prepared', summary[-1][len('prepared: ') :]))

  stream = {}
  sizes = (('whole corpus', 0), (f'first {args.small_examples} pairs', args.small_examples))
  for label, n in () if args.skip_stream else sizes:
    if n:  # prepare the subset outside the measurement
      _spawn(_cli('prepare', args.workdir, args.config, data + [f'--config.max_train_examples={n}']))
    r = _spawn(
      [
        sys.executable,
        os.path.abspath(__file__),
        '--_stream',
        f'--corpus={args.corpus}',
        f'--workdir={args.workdir}',
        f'--max_examples={n}',
        f'--stream_seconds={args.stream_seconds}',
        f'--t0={time.time()}',
      ],
      log=log + f'.stream{n}',
    )
    result = json.loads(r['stdout'].strip().splitlines()[-1])
    stream[label] = (result, r['peak_rss_gb'])
    rows.append(
      (
        f'stream, {label} ({result["examples"]} examples): process start -> first batch',
        f'{result["first_batch_s"]:.1f} s (build_datasets {result["build_s"]:.1f} s)',
      )
    )
    rows.append(
      (
        f'stream, {label}: real target tokens/s (steady, {args.stream_seconds:.0f} s)',
        f'**{result["tokens_per_s"]:,.0f}** ({result["rows_per_s"]:,.0f} rows/s; '
        f'real target slots {result["efficiency"]:.3f})',
      )
    )
    mem = result.get('mem_gb', {})
    rows.append(
      (
        f'stream, {label}: peak RSS of the process; at the end: anonymous (heap) / file-backed (memmapped '
        'shards, page cache)',
        f'{r["peak_rss_gb"]:.2f} GB; {mem.get("RssAnon", 0):.3f} / {mem.get("RssFile", 0):.3f} GB',
      )
    )
  if stream:
    (big, big_rss), (small, small_rss) = stream.values()
    rows.append(
      (
        'stream peak RSS, whole / small corpus; anonymous memory, whole / small',
        f'{big_rss / small_rss:.3f}; {big["mem_gb"]["RssAnon"] / small["mem_gb"]["RssAnon"]:.3f} '
        f'({big["examples"] / small["examples"]:.0f}x the examples)',
      )
    )

  if args.train:
    model = (
      []
      if args.train_model == 'base'
      else [
        '--config.model.num_layers=1',
        '--config.model.d_model=64',
        '--config.model.num_heads=4',
        '--config.model.d_ff=128',
      ]
    )
    train = (
      data
      + model
      + [
        f'--config.batch_size={args.train_batch_size}',
        '--config.num_train_steps=3',
        '--config.checkpoint_every_steps=1',
        '--config.max_eval_examples=16',
        '--config.eval_translate_examples=0',
        '--config.eval_every_steps=1000',
        '--config.async_checkpointing=False',
      ]
    )
    for corpus, extra in (
      ('whole corpus', []),
      (f'first {args.small_examples} pairs', [f'--config.max_train_examples={args.small_examples}']),
    ):
      shutil.rmtree(os.path.join(args.workdir, 'checkpoints'), ignore_errors=True)
      for label, step in (
        ('train -> first step done (checkpoint 1 committed)', 1),
        ('train on resume -> next step done (checkpoint 2 committed)', 2),
      ):
        r = _spawn(
          _cli('train', args.workdir, args.config, train + extra),
          watch=_committed(args.workdir, step),
          log=log + f'.train{step}',
        )
        rows.append(
          (
            f'{label}, {corpus}, {args.train_model} model, {args.train_batch_size} rows',
            f'{r["seen"]:.1f} s, peak RSS {r["peak_rss_gb"]:.2f} GB' if r['seen'] else 'did not get there',
          )
        )

  if args.default_task:
    tiny = os.path.join(_REPO, 'configs', 'tiny.py')
    for name, repo in (('this checkout', _REPO), ('before', args.before_repo)):
      if not repo:
        continue
      work = os.path.join(args.workdir, f'default_{name.replace(" ", "_")}')
      shutil.rmtree(work, ignore_errors=True)
      for run in ('fresh workdir', 'second run (caches / shards present)'):
        shutil.rmtree(os.path.join(work, 'checkpoints'), ignore_errors=True)
        r = _spawn(
          [
            sys.executable,
            '-m',
            'transformer_jax.cli',
            'train',
            f'--config={tiny}',
            f'--workdir={work}',
            '--config.num_train_steps=2',
            '--config.checkpoint_every_steps=1',
            '--config.async_checkpointing=False',
          ],
          repo=repo,
          watch=_committed(work, 1),
          log=os.path.join(args.workdir, f'default_{name}_{run[:5]}'),
        )
        rows.append(
          (
            f'default task ({name}), {run}: train -> first step done',
            f'{r["seen"]:.1f} s, peak RSS {r["peak_rss_gb"]:.2f} GB' if r['seen'] else 'did not get there',
          )
        )

  print('\n    ' + ' '.join(['python', 'benchmarks/streaming_data.py'] + sys.argv[1:]) + '\n')
  print('| quantity | value |\n|---|---|')
  for k, v in rows:
    print(f'| {k} | {v} |')


if __name__ == '__main__':
  main()
