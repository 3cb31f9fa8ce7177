"""bfloat16 training against float32, end to end on this machine: the default job (configs/tiny.py) and the
language model (configs/lm_tiny.py), each trained in both compute dtypes (`--config.model.dtype=...`, everything
else the same), with the held-out metrics side by side, the train steps' wall and CPU time, and which matrix
products of the compiled CPU train step really take bfloat16 operands (from its HLO: XLA:CPU computes a
bfloat16 x bfloat16 -> bfloat16 dot in float32 on converted copies, and only bfloat16 -> float32 products run on
bfloat16 operands).

  python benchmarks/bf16_training.py [--configs=configs/tiny.py,configs/lm_tiny.py] [--workdir=/tmp/bf16_runs]
                                     [--override=num_train_steps=100 ...]
  python benchmarks/bf16_training.py --step_times_only   # the train steps alone, alternating dtypes in one process

Goals: exact match within 1 point, bits/byte within 2%.

The HLO helpers here (instructions, dots, dot_dtypes) are what tests/test_bf16.py checks the compiled TPU and CPU
programs with.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------------------
# HLO text: instructions with their operands' dtypes

_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.-]+)\s*(?:\(.*)?\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.-]+)\s*=\s*(\(.*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+([\w-]+)\((.*)$')
_OPERAND = re.compile(r'(?:(\w+)\[[^\]]*\](?:\{[^}]*\})?\s+)?%?([\w.-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TO_APPLY = re.compile(r'to_apply=%([\w.-]+)')
FLOATS = ('f16', 'bf16', 'f32', 'f64')


class Instruction(collections.namedtuple('Instruction', 'computation name opcode dtype operands op_name root line')):
  """One HLO instruction: dtype is its result's element type ('tuple' for a tuple); operands their element types
  (in order; '?' where the text names an operand this parser did not see defined)."""


def _dtype(type_text: str) -> str:
  return 'tuple' if type_text.startswith('(') else type_text.split('[', 1)[0]


def _arguments(rest: str) -> str:
  depth = 1
  for i, c in enumerate(rest):
    depth += {'(': 1, ')': -1}.get(c, 0)
    if not depth:
      return rest[:i]
  return rest


def instructions(hlo: str) -> list[Instruction]:
  """Every instruction of HLO text (compiled or not; names with or without '%'). Operands are printed by name only: their types come
  from the operand's definition in the same computation (HLO defines an operand before its use)."""
  out, types, computation = [], {}, None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      computation, types = m.group(1), {}
      continue
    m = _INSTRUCTION.match(line)
    if not m or computation is None:
      continue
    root, name, type_text, opcode, rest = m.groups()
    types[name] = _dtype(type_text)
    operands = tuple(d or types.get(n, '?') for d, n in _OPERAND.findall(_arguments(rest)))
    op_name = _OP_NAME.search(line)
    out.append(
      Instruction(
        computation, name, opcode, _dtype(type_text), operands, op_name.group(1) if op_name else '', bool(root), line
      )
    )
  return out


def dots(hlo: str) -> list[Instruction]:
  """The matrix products: dot and convolution instructions (the TPU compiler rewrites most dots as convolutions)."""
  return [i for i in instructions(hlo) if i.opcode in ('dot', 'convolution')]


def dot_dtypes(hlo: str) -> collections.Counter:
  """Counter of 'lhs x rhs -> result' element types over the matrix products."""
  return collections.Counter(f'{d.operands[0]} x {d.operands[1]} -> {d.dtype}' for d in dots(hlo))


def float_add_reductions(hlo: str) -> list[Instruction]:
  """reduce instructions over floating point whose reducer adds (sums: softmax denominators, LayerNorm statistics,
  the loss, gradients of broadcasts); a max or min is exact in any dtype."""
  ins = instructions(hlo)
  root_opcode = {i.computation: i.opcode for i in ins if i.root}
  found = []
  for i in ins:
    apply = _TO_APPLY.search(i.line) if i.opcode == 'reduce' else None
    if apply and i.dtype in FLOATS and root_opcode.get(apply.group(1)) == 'add':
      found.append(i)
  return found


def entry_parameters(hlo: str) -> list[Instruction]:
  ins = instructions(hlo)
  entry = next(line for line in hlo.splitlines() if line.startswith('ENTRY'))
  name = _COMPUTATION.match(entry).group(1)
  return [i for i in ins if i.computation == name and i.opcode == 'parameter']


def compiled_train_hlo(config, platform: str | None = None) -> str:
  """The HLO text of config's train step compiled for this process's backend (unsharded, one device)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  from transformer_jax.training import optim
  from transformer_jax.training import train
  from transformer_jax.training import train_state
  from transformer_jax.model.transformer import build_model

  model = build_model(train_state.model_config(config, platform=platform))
  tx = optim.make_optimizer(config)
  state = jax.eval_shape(lambda: nn.meta.unbox(train_state.init_boxed_state(model, tx, config, jax.random.key(0))))
  batch = {
    k: jax.ShapeDtypeStruct(v.shape, v.dtype)
    for k, v in train_state.dummy_batch(config, rows=config.batch_size).items()
  }
  batch.update(
    {
      f'{k}_{s}': jax.ShapeDtypeStruct(v.shape, jnp.int32)
      for k, v in list(batch.items())
      for s in ('segmentation', 'position')
    }
  )
  key = jax.random.key(0)
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype)
  return jax.jit(train.make_train_step(model, tx, config)).lower(state, batch, rng).compile().as_text()


def step_times(config, rounds: int = 3, steps: int = 20) -> dict[str, float]:
  """Seconds per train step of config in float32 and bfloat16, timed in alternating rounds in this process (so a
  shared machine's load falls on both alike): the median over rounds of each round's mean. Random token batches."""
  import jax
  import numpy as np
  from flax import linen as nn
  from transformer_jax.training import optim
  from transformer_jax.training import train
  from transformer_jax.training import train_state
  from transformer_jax.model.transformer import build_model

  rng = np.random.default_rng(0)
  batch = {
    k: rng.integers(3, config.model.vocab_size, size=(config.batch_size, v.shape[1]), dtype=np.int32)
    for k, v in train_state.dummy_batch(config).items()
  }
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    model = build_model(train_state.model_config(config))
    tx = optim.make_optimizer(config)
    state = jax.jit(lambda r: nn.meta.unbox(train_state.init_boxed_state(model, tx, config, r)))(jax.random.key(0))
    step = jax.jit(train.make_train_step(model, tx, config))
    state, _ = step(state, batch, jax.random.key(1))
    jax.block_until_ready(state)
    runs[dtype] = [step, state, []]
  for _ in range(rounds):
    for dtype, run in runs.items():
      start = time.perf_counter()
      for _ in range(steps):
        run[1], metrics = run[0](run[1], batch, jax.random.key(1))
      jax.block_until_ready(metrics)
      run[2].append((time.perf_counter() - start) / steps)
  return {dtype: float(np.median(run[2])) for dtype, run in runs.items()}


# ---------------------------------------------------------------------------------------------------------------------
# the runs


def _load_config(path: str):
  import importlib.util

  spec = importlib.util.spec_from_file_location('bench_config', os.path.join(_REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _train(config_path: str, dtype: str, workdir: str, data_dir: str, overrides: list[str]) -> dict:
  if os.path.isdir(workdir):
    shutil.rmtree(workdir)  # a run left from before would resume (or just evaluate) instead of training
  cmd = [
    sys.executable,
    '-m',
    'transformer_jax.cli',
    'train',
    f'--config={config_path}',
    f'--workdir={workdir}',
    f'--config.model.dtype={dtype}',
    f'--config.prepared_data_dir={data_dir}',
  ] + [f'--config.{o}' for o in overrides]
  print('$ ' + ' '.join(shlex.quote(c) for c in cmd), flush=True)
  start = time.time()
  proc = subprocess.run(
    cmd, cwd=_REPO, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, check=False
  )
  wall = time.time() - start
  if proc.returncode:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
    raise SystemExit(f'train failed ({proc.returncode}): {config_path} {dtype}')
  final = re.findall(r'^final: (.*)$', proc.stdout, re.M)[-1]
  metrics = {k: float(v) for k, v in re.findall(r'(\w+)=([-\d.e+naif]+)', final)}
  steps = re.search(r'steps \d+\.\.\d+ ([\d.]+) s \(cpu ([\d.]+) s\)', proc.stderr)
  metrics.update(
    wall_s=wall,
    steps_wall_s=float(steps.group(1)) if steps else float('nan'),
    steps_cpu_s=float(steps.group(2)) if steps else float('nan'),
  )
  return metrics


def _hlo_summary(config_path: str, dtype: str) -> str:
  config = _load_config(config_path)
  config.model.dtype = dtype
  counts = dot_dtypes(compiled_train_hlo(config))
  return ', '.join(f'{n} {k}' for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--configs', default='configs/tiny.py,configs/lm_tiny.py')
  parser.add_argument('--workdir', default='/tmp/bf16_runs')
  parser.add_argument('--override', action='append', default=[], help='config override for every run, KEY=VALUE')
  parser.add_argument(
    '--step_times_only',
    action='store_true',
    help='only time the train steps of both dtypes in alternating rounds (no training runs)',
  )
  args = parser.parse_args()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  command = 'python ' + ' '.join(shlex.quote(a) for a in sys.argv)
  if args.step_times_only:
    for config_path in args.configs.split(','):
      times = step_times(_load_config(config_path))
      print(
        f'{config_path}: train step float32 {1e3 * times["float32"]:.1f} ms, bfloat16 '
        f'{1e3 * times["bfloat16"]:.1f} ms (bfloat16/float32 {times["bfloat16"] / times["float32"]:.2f})'
      )
    return
  rows = []
  for config_path in args.configs.split(','):
    name = os.path.splitext(os.path.basename(config_path))[0]
    data_dir = os.path.join(args.workdir, name, 'data')  # prepared once, by the first run: both dtypes read it
    results = {}
    for dtype in ('float32', 'bfloat16'):
      results[dtype] = _train(config_path, dtype, os.path.join(args.workdir, name, dtype), data_dir, args.override)
      print(name, dtype, results[dtype], flush=True)
    rows.append((name, results, {d: _hlo_summary(config_path, d) for d in ('float32', 'bfloat16')}))

  print(f'\n{command}\n')
  print('| config | metric | float32 | bfloat16 | difference | steps wall bf16/f32 | steps CPU bf16/f32 |')
  print('|---|---|---|---|---|---|---|')
  for name, r, _ in rows:
    f, b = r['float32'], r['bfloat16']
    ratios = (
      f'{b["steps_wall_s"] / f["steps_wall_s"]:.2f} ({b["steps_wall_s"]:.0f} / {f["steps_wall_s"]:.0f} s)',
      f'{b["steps_cpu_s"] / f["steps_cpu_s"]:.2f} ({b["steps_cpu_s"]:.0f} / {f["steps_cpu_s"]:.0f} s)',
    )
    for metric in ('exact_match', 'chrf', 'bits_per_byte', 'nll'):
      if metric not in f:
        continue
      diff = b[metric] - f[metric]
      text = f'{diff:+.2f} points' if metric in ('exact_match', 'chrf') else f'{100 * diff / f[metric]:+.2f}%'
      print(f'| {name} | {metric} | {f[metric]:.4g} | {b[metric]:.4g} | {text} | {ratios[0]} | {ratios[1]} |')
  print('\nmatrix products of the compiled CPU train step (lhs x rhs -> result: count):')
  for name, _, hlo in rows:
    for dtype, summary in hlo.items():
      print(f'  {name} {dtype}: {summary}')


if __name__ == '__main__':
  main()
