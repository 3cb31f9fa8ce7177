"""Train-step time and memory against sequence length: dense, blockwise and windowed attention (attention.py).

One decoder layer (d_model 64, 2 heads, vocabulary 256, so attention dominates), one row of T tokens, loss and
gradients under jax.jit. Per (attention, T), in its own subprocess: XLA's compile-time plan of temporaries
(`compiled.memory_analysis().temp_size_in_bytes`), the median step time and the process's peak RSS. Configurations
whose planned temporaries exceed --run_limit_gib are compiled only (dense at 32k plans ~16 GiB of logits).

    JAX_PLATFORMS=cpu python benchmarks/long_attention.py [--lengths=512,2048,8192,32768] [--tpu]

--tpu also compiles blockwise and splash (window off and 512) for one v5e chip ahead of time
(jax.experimental.topologies; nothing runs) and reports their planned temporaries and flops.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

KINDS = {
  'dense': ('dense', 0),
  'blockwise': ('blockwise', 0),
  'windowed': ('blockwise', 512),
  'splash': ('splash', 0),
  'splash_windowed': ('splash', 512),
}


def train_step_and_args(kind: str, length: int, block: int, device=None):
  """(jitted loss-and-grad step, abstract params, abstract tokens) of the one-layer model."""
  import jax
  import jax.numpy as jnp
  from transformer_jax.model.transformer import LanguageModel, ModelConfig

  attention, window = KINDS[kind]
  cfg = ModelConfig(
    vocab_size=256,
    num_layers=1,
    d_model=64,
    num_heads=2,
    d_ff=256,
    dropout_rate=0.0,
    max_len=length,
    kind='decoder',
    pre_norm=True,
    attention=attention,
    attention_window=window,
    attention_block_size=block,
    dtype=jnp.bfloat16 if device is not None else jnp.float32,
  )
  model = LanguageModel(cfg)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, length), jnp.int32))['params'])
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  if device is not None:
    sharding = jax.sharding.SingleDeviceSharding(device)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), params)
    tokens = jax.ShapeDtypeStruct(tokens.shape, tokens.dtype, sharding=sharding)

  def loss(params, tokens):
    logits = model.apply({'params': params}, tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  return jax.jit(jax.value_and_grad(loss)), params, tokens


def measure_one(kind: str, length: int, block: int, steps: int, run_limit_gib: float) -> dict:
  import jax
  import numpy as np

  step, params, tokens = train_step_and_args(kind, length, block)
  start = time.perf_counter()
  compiled = step.lower(params, tokens).compile()
  result = dict(
    kind=kind,
    length=length,
    compile_s=time.perf_counter() - start,
    temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
  )
  if result['temp_bytes'] > run_limit_gib * 2**30:
    return result
  real_params = jax.tree.map(lambda x: np.random.default_rng(0).normal(0, 0.05, x.shape).astype(x.dtype), params)
  real_tokens = np.random.default_rng(1).integers(4, 256, size=tokens.shape).astype(np.int32)
  jax.block_until_ready(compiled(real_params, real_tokens))  # warm-up
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(real_params, real_tokens))
    times.append(time.perf_counter() - start)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  result.update(step_s=statistics.median(times), peak_rss_bytes=peak_rss)
  return result


def compile_tpu(kind: str, length: int, block: int) -> dict:
  """Ahead-of-time compile for one chip of a v5e 2x2 topology (a single chip is not a valid topology name)."""
  from jax.experimental import topologies

  device = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices[0]
  step, params, tokens = train_step_and_args(kind, length, block, device=device)
  start = time.perf_counter()
  compiled = step.lower(params, tokens).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return dict(
    kind=kind,
    length=length,
    compile_s=time.perf_counter() - start,
    temp_bytes=compiled.memory_analysis().temp_size_in_bytes,
    flops=float(cost.get('flops', 0.0)),
  )


def _child(args, *extra) -> dict:
  # libtpu's lockfile admits one process per host; an ahead-of-time compile touches no chip, so sharing is safe.
  env = dict(os.environ, JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')
  out = subprocess.run(
    [
      sys.executable,
      __file__,
      *extra,
      f'--block={args.block}',
      f'--steps={args.steps}',
      f'--run_limit_gib={args.run_limit_gib}',
    ],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if out.returncode:
    return dict(error=(out.stderr.strip().splitlines() or ['?'])[-1][:160])
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(x):
  return f'{x / 2**20:,.1f}' if x is not None else '-'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--lengths', default='512,2048,8192,32768')
  parser.add_argument('--kinds', default='dense,blockwise,windowed')
  parser.add_argument('--block', type=int, default=512)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--run_limit_gib', type=float, default=6.0)
  parser.add_argument('--tpu', action='store_true')
  parser.add_argument('--one', nargs=2, metavar=('KIND', 'LENGTH'))
  parser.add_argument('--one_tpu', nargs=2, metavar=('KIND', 'LENGTH'))
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.block, args.steps, args.run_limit_gib)))
    return
  if args.one_tpu:
    print(json.dumps(compile_tpu(args.one_tpu[0], int(args.one_tpu[1]), args.block)))
    return
  lengths = [int(x) for x in args.lengths.split(',')]
  print(f'command: JAX_PLATFORMS=cpu python {" ".join(sys.argv)}')
  print('| attention | T | planned temps MiB | x vs 2k | step s | x vs 2k | peak RSS MiB | compile s |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for kind in filter(None, args.kinds.split(',')):  # --kinds= : the TPU table only
    rows = {t: _child(args, '--one', kind, str(t)) for t in lengths}
    base = rows.get(2048, {})
    for t, r in rows.items():
      if 'error' in r:
        print(f'| {kind} | {t} | error: {r["error"]} |')
        continue
      temp_x = f'{r["temp_bytes"] / base["temp_bytes"]:.1f}' if base.get('temp_bytes') else '-'
      step_x = f'{r["step_s"] / base["step_s"]:.1f}' if 'step_s' in r and base.get('step_s') else '-'
      step = f'{r["step_s"]:.3f}' if 'step_s' in r else 'not run (plan only)'
      print(
        f'| {kind} | {t} | {_mib(r["temp_bytes"])} | {temp_x} | {step} | {step_x} | '
        f'{_mib(r.get("peak_rss_bytes"))} | {r["compile_s"]:.1f} |',
        flush=True,
      )
  if args.tpu:
    print('\nTPU v5e, one chip, bfloat16, ahead-of-time compile (nothing runs):')
    print('| attention | T | planned temps MiB | GFLOP per step | compile s |')
    print('|---|---:|---:|---:|---:|')
    for kind in ('blockwise', 'windowed', 'splash', 'splash_windowed'):
      for t in lengths:
        r = _child(args, '--one_tpu', kind, str(t))
        if 'error' in r:
          print(f'| {kind} | {t} | error: {r["error"]} |', flush=True)
          continue
        print(
          f'| {kind} | {t} | {_mib(r["temp_bytes"])} | {r["flops"] / 1e9:,.1f} | {r["compile_s"]:.1f} |', flush=True
        )


if __name__ == '__main__':
  main()
