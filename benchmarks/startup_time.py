r"""What a fresh process pays before it does any work: CPU seconds of imports and of a command that stops at once.

    python benchmarks/startup_time.py [--repeats=5]

Every `transformer-jax` command, every worker of a multi-process run and most end-to-end tests start a fresh
interpreter, so its start-up is paid many times (the test suite starts over a hundred). Each row runs in its own
interpreter, `--repeats` times; the table gives the median user+system CPU and wall seconds (CPU seconds are what a
shared 2-core machine runs out of; wall seconds include waiting on the disk). Rows:

- `import ml_dtypes`: jax's dtype extension (its import cost depends on the version: pyproject keeps < 0.7);
- `import jax`, `import transformer_jax.training.train` (jax, flax, optax, orbax: what `train` imports);
- `transformer-jax evaluate --workdir=MISSING`: the CLI up to its one-line refusal;
- bad flags on an existing (empty) workdir: `generate --temperature=-1`, `translate --beam_size=0`,
  `evaluate --batch_size=0` (refused before jax is imported or a checkpoint opened).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = (
  ('import ml_dtypes', [sys.executable, '-c', 'import ml_dtypes']),
  ('import jax', [sys.executable, '-c', 'import jax']),
  ('import transformer_jax.training.train', [sys.executable, '-c', 'import transformer_jax.training.train']),
  (
    'transformer-jax evaluate --workdir=MISSING',
    [sys.executable, '-m', 'transformer_jax.cli', 'evaluate', '--workdir={missing}'],
  ),
  (
    'transformer-jax generate --temperature=-1',
    [sys.executable, '-m', 'transformer_jax.cli', 'generate', '--workdir={empty}', '--temperature=-1', '--prompt=x'],
  ),
  (
    'transformer-jax translate --beam_size=0',
    [sys.executable, '-m', 'transformer_jax.cli', 'translate', '--workdir={empty}', '--beam_size=0'],
  ),
  (
    'transformer-jax evaluate --batch_size=0',
    [sys.executable, '-m', 'transformer_jax.cli', 'evaluate', '--workdir={empty}', '--batch_size=0'],
  ),
)


def measure(argv: list[str], env: dict) -> tuple[float, float]:
  """(CPU seconds, wall seconds) of one run of argv, its children included."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  subprocess.run(
    argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=False
  )
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  import ml_dtypes

  print(f'ml_dtypes {ml_dtypes.__version__}; median of {args.repeats} runs, each in a fresh interpreter\n')
  print('| what | CPU s | wall s |\n|---|---|---|')
  with tempfile.TemporaryDirectory() as tmp:
    missing, empty = os.path.join(tmp, 'missing'), os.path.join(tmp, 'empty')
    os.mkdir(empty)
    for name, argv in ROWS:
      argv = [a.format(missing=missing, empty=empty) for a in argv]
      runs = [measure(argv, env) for _ in range(args.repeats)]
      print(
        f'| {name} | {statistics.median(c for c, _ in runs):.2f} | {statistics.median(w for _, w in runs):.2f} |',
        flush=True,
      )
  print(f'\ncommand: python benchmarks/startup_time.py --repeats={args.repeats}')


if __name__ == '__main__':
  main()
