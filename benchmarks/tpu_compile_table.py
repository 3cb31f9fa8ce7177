"""The README's table "Check a TPU run before you pay for it": base and big, train step, on the slices below.

Runs `transformer-jax compile` once per (config, slice), one at a time (each is minutes of CPU), keeps each JSON
in --out, and prints a Markdown table. --table_only re-prints it from the JSON files already there. Every time,
rate and MFU in it is an ESTIMATE (nothing runs on a TPU): the per-op roofline first (tpu_report.per_op_times),
the ceiling (perfect overlap) in brackets, then the floor (no overlap) and libtpu's own per-instruction cycles.

  python benchmarks/tpu_compile_table.py --out=benchmarks/tpu_compile --hlo_dir=benchmarks/tpu_compile
  python benchmarks/tpu_compile_table.py --table_only --reanalyse --hlo_dir=benchmarks/tpu_compile  # re-read HLO
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys

CONFIGS = ('base', 'big')
TOPOLOGIES = ('v4-8', 'v5e-8', 'v5e-16', 'v5p-8', 'v6e-8')
# The configs' own mesh (data-parallel): on base v5e-8 and big v5e-16 it is the faster one by the per-op estimate
# (`compile --meshes=data,fsdp` compares them), so the commands here are the README's, copied as they are.
MESH = ()


def command(config: str, topology: str, path: str, hlo_prefix: str = '') -> list[str]:
  return [
    'transformer-jax',
    'compile',
    f'--config=configs/{config}.py',
    *MESH,
    f'--topology={topology}',
    '--programs=train',
    f'--json={path}',
  ] + ([f'--hlo={hlo_prefix}'] if hlo_prefix else [])


HEADER = (
  '| config | slice | mesh | fits | GiB per chip | compile s | XLA / model TFLOP per chip | HBM est. GiB | '
  'collectives (logical) | est. step ms, per-op (ceiling) | est. target tok/s, per-op | MFU per-op (ceiling) | '
  'floor | libtpu cycles |'
)


def _logical(c: dict) -> str:
  return ', '.join(
    f'{k} {v["count"]}' + (f' ({v["executions"]} runs)' if v.get('executions', v['count']) != v['count'] else '')
    for k, v in c.items()
  )


def row(config: str, topology: str, payload: dict) -> str:
  columns = HEADER.count('|') - 1
  if not payload['programs']:
    return f'| {config} | {topology} | | refused: {payload.get("refused", "?")} |' + ' |' * (columns - 4)
  p = payload['programs'][0]
  m, e, c = p['memory'], p['estimate'], p['collectives']
  po, fl, cy = p.get('per_op'), p.get('floor'), p.get('libtpu_cycles')
  model = p['model_flops'] / p['chips'] / 1e12
  mesh = 'x'.join(str(p['mesh'][a]) for a in ('data', 'fsdp', 'tensor'))
  pct = lambda d: f'{d["mfu"] * 100:.1f}%' if d else '—'
  est = (
    f'{po["t_step_s"] * 1e3:.1f} ({e["t_step_s"] * 1e3:.1f}) | {po["tokens_per_s"]:,.0f} | {pct(po)} ({pct(e)})'
    if po
    else f'— ({e["t_step_s"] * 1e3:.1f}) | — | — ({pct(e)})'
  )
  return (
    f'| {config} | {topology} ({p["chips"]} chips) | {mesh} | {"yes" if p["fits"] else "NO"} | '
    f'{m["total"] / 2**30:.2f} (state {m["state"] / 2**30:.2f}, temp {m["temporaries"] / 2**30:.2f}) | '
    f'{p["compile_s"]:.0f} | {p["flops_per_chip"] / 1e12:.2f} / {model:.2f} | '
    f'{p.get("hbm_bytes_per_chip", float("nan")) / 2**30:.2f} | {_logical(c)} | {est} | {pct(fl)} | {pct(cy)} |'
  )


def reanalyse(payload: dict, hlo_text: str) -> None:
  """Recomputes a saved train step's per-op, floor and libtpu-cycle figures from its HLO with this checkout's
  tpu_report (the compiled program is the same; only its reading changed)."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from transformer_jax.tpu import chips as tpu_chips
  from transformer_jax.tpu import report as tpu_report

  p = payload['programs'][0]
  chip = tpu_chips.CHIPS[p['chip']]
  torus = tuple(int(d) for d in p['topology'].split(':')[1].split(' ')[0].split('x'))
  axes = ('data', 'fsdp', 'tensor')
  per_op = tpu_report.per_op_times(
    hlo_text, chip, tuple(p['mesh'][a] for a in axes), axes, p['num_slices'], torus=torus
  )
  estimate, floor, cycles = tpu_report.per_op_fields(per_op, chip)
  for e in (estimate, floor, cycles):
    e['tokens_per_s'] = p['tokens_per_step'] / e['t_step_s']
    e['mfu'] = tpu_chips.mfu(p['model_flops'], e['t_step_s'], chip, p['chips'])
  p.update(per_op=estimate, floor=floor, libtpu_cycles=cycles, top_ops=[list(t) for t in per_op.top])


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks/tpu_compile')
  parser.add_argument('--table_only', action='store_true')
  parser.add_argument('--only', default='', help='config:slice,... to compile, in this order (default: all)')
  parser.add_argument('--hlo_dir', default='', help='also keep each compiled HLO text here (CONFIG_SLICE.train.hlo.gz)')
  parser.add_argument(
    '--reanalyse',
    action='store_true',
    help='recompute the per-op figures of the JSON files in --out from the HLO kept in --hlo_dir, and rewrite them',
  )
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  wanted = [tuple(p.split(':')) for p in args.only.split(',') if p]
  for config, topology in [] if args.table_only else wanted or [(c, t) for c in CONFIGS for t in TOPOLOGIES]:
    path = os.path.join(args.out, f'{config}_{topology}.json')
    hlo = os.path.join(args.hlo_dir, f'{config}_{topology}') if args.hlo_dir else ''
    print('$ ' + ' '.join(command(config, topology, path, hlo)), file=sys.stderr, flush=True)
    # the package this interpreter imports (a checkout on PYTHONPATH measures that checkout)
    subprocess.run(
      [sys.executable, '-m', 'transformer_jax.cli'] + command(config, topology, path, hlo)[1:], check=False
    )
  if args.reanalyse:
    for config in CONFIGS:
      for topology in TOPOLOGIES:
        path = os.path.join(args.out, f'{config}_{topology}.json')
        hlo = os.path.join(args.hlo_dir, f'{config}_{topology}.train.hlo.gz')
        if os.path.exists(path) and os.path.exists(hlo):
          with open(path, encoding='utf-8') as f, gzip.open(hlo, 'rt', encoding='utf-8') as h:
            payload = json.load(f)
            reanalyse(payload, h.read())
          with open(path, 'w', encoding='utf-8') as f:
            json.dump(payload, f, indent=1, default=float)
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
