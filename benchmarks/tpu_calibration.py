"""Calibration of `transformer-jax compile`'s per-operation estimate against MFU measured on TPUs and published.

Each case is a MaxText decoder-only recipe for v5e-256 compiled as this project's language model (model.kind
'decoder') at the same shape: layers, d_model, heads of 128, the same matmul parameters per layer, sequence length,
global batch, chips, full remat, flash (here: splash) attention, fsdp over all chips, layers scanned.

Source of the measurements: AI-Hypercomputer/maxtext, MaxText/configs/v5e/README.md ("1x v5e-256": 16B 61.10% MFU,
120 TFLOP/s/chip; 32B 66.86%, 132), with the runs' flags in MaxText/configs/v5e/16b.sh and 32b.sh
(per_device_batch_size 6 and 4, max_target_length 2048, remat_policy=full, attention='flash') and the shapes from
MaxText/configs/base.yml (base_emb_dim 2048, base_num_query_heads 16, base_mlp_dim 7168, base_num_decoder_layers 16,
head_dim 128, mlp_activations [silu, linear], vocab 32000) scaled by pyconfig.get_individual_scales
(global_parameter_scale 16: emb x2, heads x4, mlp x4, layers x2; 32: emb x4, heads x4, mlp x4, layers x2).

What differs, and how it is matched:
- MaxText's MLP is gated (three d_model x mlp_dim matrices); this model's is not: d_ff = 3/2 mlp_dim gives the same
  matmul parameters and FLOPs per layer.
- 16B: 64 heads of 128 on d_model 4096 (attention width 8192); here heads x head_dim = d_model, so 32 heads of 128
  (width 4096) with the difference moved into d_ff (51,200 keeps the layer's matmul parameters): attention's
  T^2 work is half of MaxText's, ~3% of the step. 32B: 64 x 128 = 8192 = d_model, the same.
- MaxText counts MFU with its own FLOP formula; this compares MFU to MFU (each model's FLOPs over its step time).

Runs `transformer-jax compile` per case (minutes each on a small CPU), keeping the JSON and the HLO in --out; with
--reuse, reads what is already there. Prints the table and the `calibrated on:` line for tpu_chips.CALIBRATION.

  python benchmarks/tpu_calibration.py --out=benchmarks/tpu_compile
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from transformer_jax.tpu import chips as tpu_chips
from transformer_jax.tpu import report as tpu_report

SOURCE = 'MaxText configs/v5e/README.md, 1x v5e-256'
# name: (measured MFU, layers, d_model, heads, d_ff, per-device batch, topology)
CASES = {
  'maxtext_16b': (0.6110, 32, 4096, 32, 51200, 6, 'v5e-256'),
  'maxtext_32b': (0.6686, 32, 8192, 64, 43008, 4, 'v5e-256'),
}
AXES = ('data', 'fsdp', 'tensor')


def command(name: str, out: str) -> list[str]:
  _, layers, d_model, heads, d_ff, per_device, topology = CASES[name]
  chips = int(topology.split('-')[1])
  model = dict(
    kind='decoder',
    vocab_size=32000,
    num_layers=layers,
    d_model=d_model,
    num_heads=heads,
    d_ff=d_ff,
    activation='silu',
    use_bias=False,
    share_embeddings=False,
    dtype='auto',
    remat='full',
    scan_layers=True,
    attention='splash',
    attention_block_size=512,
    dropout_rate=0.0,
  )
  return (
    ['transformer-jax', 'compile', '--config=configs/lm_tiny.py']
    + [f'--config.model.{k}={v}' for k, v in model.items()]
    + [
      '--config.max_length=2048',
      '--config.packed_inputs_length=2048',
      '--config.packed_targets_length=2048',
      f'--config.batch_size={per_device * chips}',
      '--config.mesh.data=1',
      '--config.mesh.fsdp=-1',
      f'--topology={topology}',
      '--programs=train',
      f'--json={os.path.join(out, name + ".json")}',
      f'--hlo={os.path.join(out, name)}',
    ]
  )


def evaluate(name: str, out: str) -> dict:
  """The per-op estimate of a compiled case, from its JSON (model FLOPs, mesh) and its HLO text."""
  with open(os.path.join(out, name + '.json'), encoding='utf-8') as f:
    p = json.load(f)['programs'][0]
  with gzip.open(os.path.join(out, name + '.train.hlo.gz'), 'rt', encoding='utf-8') as f:
    hlo = f.read()
  chip = tpu_chips.CHIPS[p['chip']]
  torus = tuple(int(d) for d in p['topology'].split(':')[1].split('x'))
  per_op = tpu_report.per_op_times(hlo, chip, tuple(p['mesh'][a] for a in AXES), AXES, torus=torus)
  mfu = lambda t: tpu_chips.mfu(p['model_flops'], t, chip, p['chips'])
  measured = CASES[name][0]
  return {
    'case': name,
    'chips': p['chips'],
    'measured_mfu': measured,
    'per_op_mfu': mfu(per_op.t_per_op_s),
    'ceiling_mfu': p['estimate']['mfu'],
    'floor_mfu': mfu(per_op.t_floor_s),
    'cycles_mfu': mfu(per_op.cycles / chip.clock_hz),
    't_per_op_s': per_op.t_per_op_s,
    't_measured_s': p['model_flops'] / (measured * chip.peak_bf16_flops * p['chips']),
    't_compute_s': per_op.t_compute_s,
    't_hbm_s': per_op.t_hbm_s,
    't_ici_s': per_op.t_ici_s,
    't_ici_exposed_s': per_op.t_ici_exposed_s,
    'gib_per_chip': p['memory']['total'] / 2**30,
    'fits': p['fits'],
    'compile_s': p['compile_s'],
  }


def calibration_line(rows: list[dict]) -> str:
  return (
    '; '.join(
      f'MaxText {r["case"].split("_")[1].upper()} on v5e-'
      f'{r["chips"]}: per-op {r["per_op_mfu"] * 100:.1f}% vs measured {r["measured_mfu"] * 100:.2f}% '
      f'(x{r["per_op_mfu"] / r["measured_mfu"]:.2f})'
      for r in rows
    )
    + f' [{SOURCE}]'
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks/tpu_compile')
  parser.add_argument('--reuse', action='store_true', help='read the JSON and HLO already in --out')
  parser.add_argument('--only', default='', help='comma-separated case names (default: all)')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  names = [n for n in args.only.split(',') if n] or list(CASES)
  for name in names:
    done = all(os.path.exists(os.path.join(args.out, name + ext)) for ext in ('.json', '.train.hlo.gz'))
    if not (args.reuse and done):
      cmd = command(name, args.out)
      print('$ ' + ' '.join(cmd), file=sys.stderr, flush=True)
      # exit 1 = compiled but over HBM: still a step time to compare (the table says it does not fit)
      subprocess.run([sys.executable, '-m', 'transformer_jax.cli'] + cmd[1:], check=False, cwd=_REPO)
  rows = [evaluate(n, args.out) for n in names]
  print(
    '| case (v5e) | chips | GiB per chip | measured MFU | per-op est. | est. / measured | ceiling | floor | '
    'libtpu cycles | per-op terms: dot FLOPs / HBM / ICI (exposed) s | est. / measured step s |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["case"]} | {r["chips"]} | {r["gib_per_chip"]:.2f}{"" if r["fits"] else " (over 16)"} | '
      f'{r["measured_mfu"] * 100:.2f}% | '
      f'{r["per_op_mfu"] * 100:.1f}% | {r["per_op_mfu"] / r["measured_mfu"]:.2f} | {r["ceiling_mfu"] * 100:.1f}% | '
      f'{r["floor_mfu"] * 100:.1f}% | {r["cycles_mfu"] * 100:.1f}% | {r["t_compute_s"]:.2f} / {r["t_hbm_s"]:.2f} / '
      f'{r["t_ici_s"]:.2f} ({r["t_ici_exposed_s"]:.2f}) | {r["t_per_op_s"]:.2f} / {r["t_measured_s"]:.2f} |'
    )
  with open(os.path.join(args.out, 'calibration.json'), 'w', encoding='utf-8') as f:
    json.dump(rows, f, indent=1)
  print(f'calibrated on: {calibration_line(rows)}')


if __name__ == '__main__':
  main()
