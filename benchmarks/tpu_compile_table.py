"""The README's table "Check a TPU run before you pay for it": base and big, train step, on the slices below.

Runs `transformer-jax compile` once per (config, slice), one at a time (each is minutes of CPU), keeps each JSON
in --out, and prints a Markdown table. --table_only re-prints it from the JSON files already there.

  python benchmarks/tpu_compile_table.py --out=benchmarks/tpu_compile
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = ('base', 'big')
TOPOLOGIES = ('v4-8', 'v5e-8', 'v5e-16', 'v5p-8', 'v6e-8')
MESH = ('--config.mesh.data=1', '--config.mesh.fsdp=-1')


def command(config: str, topology: str, path: str) -> list[str]:
  return ['transformer-jax', 'compile', f'--config=configs/{config}.py', *MESH, f'--topology={topology}',
          '--programs=train', f'--json={path}']


def row(config: str, topology: str, payload: dict) -> str:
  if not payload['programs']:
    return f"| {config} | {topology} | refused: {payload.get('refused', '?')} |" + ' |' * 7
  p = payload['programs'][0]
  m, e, c = p['memory'], p['estimate'], p['collectives']
  colls = ', '.join(f"{k} {v['count']}" for k, v in c.items())
  return (f"| {config} | {topology} ({p['chips']} chips) | {'yes' if p['fits'] else 'NO'} | "
          f"{m['total'] / 2**30:.2f} (state {m['state'] / 2**30:.2f}, temp {m['temporaries'] / 2**30:.2f}) | "
          f"{p['compile_s']:.0f} | {p['flops_per_chip'] / 1e12:.2f} | {p['bytes_accessed_per_chip'] / 2**30:.1f} | "
          f"{colls} | {e['t_step_s'] * 1e3:.1f} ({e['bound_by']}) | {e['tokens_per_s']:,.0f} | {e['mfu'] * 100:.1f}% |")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks/tpu_compile')
  parser.add_argument('--table_only', action='store_true')
  parser.add_argument('--only', default='', help='config:slice,... to compile, in this order (default: all)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  wanted = [tuple(p.split(':')) for p in args.only.split(',') if p]
  for config, topology in ([] if args.table_only else wanted or [(c, t) for c in CONFIGS for t in TOPOLOGIES]):
    path = os.path.join(args.out, f'{config}_{topology}.json')
    print('$ ' + ' '.join(command(config, topology, path)), file=sys.stderr, flush=True)
    # the package this interpreter imports (a checkout on PYTHONPATH measures that checkout)
    subprocess.run([sys.executable, '-m', 'transformer_jax.cli'] + command(config, topology, path)[1:], check=False)
  lines = ['| config | slice | fits | GiB per chip | compile s | XLA TFLOP/chip | GiB accessed/chip | collectives '
           '| est. step ms | est. target tok/s | est. MFU |', '|' + '---|' * 11]
  for config in CONFIGS:
    for topology in TOPOLOGIES:
      path = os.path.join(args.out, f'{config}_{topology}.json')
      if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
          lines.append(row(config, topology, json.load(f)))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
