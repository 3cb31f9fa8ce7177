"""The README's table "Check a TPU run before you pay for it": base and big, train step, on the slices below.

Runs `transformer-jax compile` once per (config, slice), one at a time (each is minutes of CPU), keeps each JSON
in --out, and prints a Markdown table. --table_only re-prints it from the JSON files already there. Every time,
rate and MFU in it is an ESTIMATE (a roofline of the compiled program; nothing runs on a TPU): MFU est. uses the
HBM traffic estimate (tpu_report.hbm_traffic), the last column the pessimistic bound with XLA's bytes accessed.

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


def command(config: str, topology: str, path: str, hlo_prefix: str = '') -> list[str]:
  return ['transformer-jax', 'compile', f'--config=configs/{config}.py', *MESH, f'--topology={topology}',
          '--programs=train', f'--json={path}'] + ([f'--hlo={hlo_prefix}'] if hlo_prefix else [])


HEADER = ('| config | slice | fits | GiB per chip | compile s | XLA / model TFLOP per chip | XLA GiB accessed | '
          'HBM est. GiB | collectives (logical) | est. step ms | est. target tok/s | MFU est. | MFU est. if every XLA byte '
          'were HBM |')


def _logical(c: dict) -> str:
  return ', '.join(f"{k} {v['count']}" + (f" ({v['executions']} runs)" if v.get('executions', v['count']) != v['count']
                                          else '') for k, v in c.items())


def row(config: str, topology: str, payload: dict) -> str:
  columns = HEADER.count('|') - 1
  if not payload['programs']:
    return f"| {config} | {topology} | refused: {payload.get('refused', '?')} |" + ' |' * (columns - 3)
  p = payload['programs'][0]
  m, e, c = p['memory'], p['estimate'], p['collectives']
  x = p.get('estimate_xla_bytes')
  if 'hbm_bytes_per_chip' not in p:  # written before the HBM estimate: its estimate used XLA's bytes
    x, e = e, None
  model = p['model_flops'] / p['chips'] / 1e12
  est = (f"{e['t_step_s'] * 1e3:.1f} ({e['bound_by']}) | {e['tokens_per_s']:,.0f} | {e['mfu'] * 100:.1f}%" if e
         else '— | — | —')
  return (f"| {config} | {topology} ({p['chips']} chips) | {'yes' if p['fits'] else 'NO'} | "
          f"{m['total'] / 2**30:.2f} (state {m['state'] / 2**30:.2f}, temp {m['temporaries'] / 2**30:.2f}) | "
          f"{p['compile_s']:.0f} | {p['flops_per_chip'] / 1e12:.2f} / {model:.2f} | "
          f"{p['bytes_accessed_per_chip'] / 2**30:.1f} | "
          + (f"{p['hbm_bytes_per_chip'] / 2**30:.2f}" if e else '—')
          + f" | {_logical(c)} | {est} | {x['mfu'] * 100:.1f}% |")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks/tpu_compile')
  parser.add_argument('--table_only', action='store_true')
  parser.add_argument('--only', default='', help='config:slice,... to compile, in this order (default: all)')
  parser.add_argument('--hlo_dir', default='', help='also keep each compiled HLO text here (CONFIG_SLICE.train.hlo.gz)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  wanted = [tuple(p.split(':')) for p in args.only.split(',') if p]
  for config, topology in ([] if args.table_only else wanted or [(c, t) for c in CONFIGS for t in TOPOLOGIES]):
    path = os.path.join(args.out, f'{config}_{topology}.json')
    hlo = os.path.join(args.hlo_dir, f'{config}_{topology}') if args.hlo_dir else ''
    print('$ ' + ' '.join(command(config, topology, path, hlo)), file=sys.stderr, flush=True)
    # the package this interpreter imports (a checkout on PYTHONPATH measures that checkout)
    subprocess.run([sys.executable, '-m', 'transformer_jax.cli'] + command(config, topology, path, hlo)[1:],
                   check=False)
  lines = [HEADER, '|' + '---|' * (HEADER.count('|') - 1)]
  for config in CONFIGS:
    for topology in TOPOLOGIES:
      path = os.path.join(args.out, f'{config}_{topology}.json')
      if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
          lines.append(row(config, topology, json.load(f)))
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
