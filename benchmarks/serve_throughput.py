r"""Serving throughput on CPU (sentences/s), one table: ours (float32, jitted greedy / beam search; int8 weights
and compute, with an int8 key/value cache too, and bfloat16), HF MarianMTModel.generate (float32), and CTranslate2
float32 / int8 (the [serve] extra) on the same model and work.

    python benchmarks/serve_throughput.py                       # base size, 64 x 20-token sources, 40 new tokens
    python benchmarks/serve_throughput.py --systems=jax,ct2-int8 --repeats=5

The model and the work are benchmarks/decode_throughput.py's (its JaxSystem and HfSystem run unchanged): the base
Transformer (d_model 512, 6+6 layers, d_ff 2048, 8 heads, vocabulary 8000, random weights), 64 random sources of
20 tokens (19 + EOS) in one batch, exactly --new_tokens tokens generated per sentence, beam search with length
penalty alpha 0.6. CTranslate2 gets our model's weights through `export --format=ctranslate2`'s spec
(transformer_jax/export/ctranslate2.py) and is held to the same lengths with min_decoding_length =
max_decoding_length = --new_tokens; its int8 is `compute_type='int8'` (weights quantized per output channel on load,
activations per row on the fly). Its Translator runs --threads intra-op threads, as HF's torch.set_num_threads does.

Each system runs in its own process, one after the other: one untimed warm-up call per beam, then --repeats timed
calls; the table gives the median and the best run. The CPU kind (lscpu's model name and the flags that decide which
kernels run: avx2, avx512f, avx512_vnni, avx512_bf16, amx) is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (_REPO, os.path.join(_REPO, 'benchmarks')):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import decode_throughput as base  # noqa: E402  (the model, sources, and the ours / HF systems)
from transformer_jax import hugepages  # noqa: E402

SYSTEMS = ('jax', 'jax-int8', 'jax-int8-kv8', 'jax-bf16', 'hf', 'ct2-float32', 'ct2-int8')
FLAGS_OF_INTEREST = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8', 'amx_tile')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--systems', default=','.join(SYSTEMS), help=f'comma-separated: {", ".join(SYSTEMS)}')
  p.add_argument('--threads', type=int, default=2, help='threads for HF (torch) and CTranslate2 (intra_threads)')
  base.add_work_flags(p)
  return p.parse_args(argv)


def cpu_kind() -> str:
  """lscpu's model name and which of the kernel-deciding flags the CPU has."""
  try:
    text = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
  except OSError:
    return 'unknown CPU (no lscpu)'
  fields = dict(line.split(':', 1) for line in text.splitlines() if ':' in line)
  name = fields.get('Model name', '?').strip()
  flags = set(fields.get('Flags', '').split())
  have = [f for f in FLAGS_OF_INTEREST if f in flags]
  return f'{name}; flags: {", ".join(have) or "none of " + ", ".join(FLAGS_OF_INTEREST)}'


class JaxVariantSystem(base.JaxSystem):
  """Ours with other weights / compute: 'int8' (quantize.int8_params: int8 x int8 -> int32 matmuls, activations
  quantized per token), 'int8-kv8' (and model.kv_cache_dtype='int8'), 'bf16' (model.dtype=bfloat16 with bfloat16
  kernels: bfloat16 x bfloat16 -> float32 matmuls)."""

  def __init__(self, args, rows, variant: str):
    import dataclasses

    import jax.numpy as jnp
    from transformer_jax.model import quantize

    super().__init__(args, rows)
    if variant.startswith('int8'):
      self.params = quantize.int8_params(self.params)
    if variant == 'int8-kv8':
      self.cfg = dataclasses.replace(self.cfg, kv_cache_dtype='int8')
    if variant == 'bf16':
      self.params = quantize.cast_params(self.params, jnp.bfloat16)
      self.cfg = dataclasses.replace(self.cfg, dtype=jnp.bfloat16)
    self.name = f'ours {variant}'


class Ct2System:
  """CTranslate2's Translator on our model's weights (the export's spec), float32 or int8."""

  def __init__(self, args, rows, compute_type: str):
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    import ctranslate2
    import ml_collections
    import numpy as np
    from transformer_jax.export import Exportable
    from transformer_jax.export import ctranslate2 as ct2_export

    ours = base.JaxSystem(args, rows)  # the same random weights as ours (same seed)
    tokens = ['<pad>', '</s>', '<unk>', '<s>'] + [f't{i}' for i in range(4, args.vocab)]
    source = Exportable(
      config=ml_collections.ConfigDict(),
      cfg=ours.cfg,
      params=__import__('jax').tree.map(np.asarray, ours.params),
      tokenizer_path='',
      step=0,
    )
    spec = ct2_export.model_spec(source, tokens)
    spec.validate()
    spec.optimize(quantization='float32')
    self.directory = tempfile.TemporaryDirectory()
    spec.save(self.directory.name)
    del ours, source, spec
    self.translator = ctranslate2.Translator(
      self.directory.name, device='cpu', compute_type=compute_type, intra_threads=args.threads, inter_threads=1
    )
    self.sources = [[tokens[t] for t in row if t != base.EOS] for row in rows]  # the model appends EOS itself
    self.args, self.name = args, f'CTranslate2 {compute_type}'
    self.device = f'cpu, ctranslate2 {ctranslate2.__version__} ({args.threads} threads, compute_type={compute_type})'

  def run(self, beams: int):
    n = self.args.new_tokens
    results = self.translator.translate_batch(
      self.sources,
      beam_size=beams,
      length_penalty=self.args.alpha,
      min_decoding_length=n,
      max_decoding_length=n,
      max_batch_size=0,
    )
    lengths = [len(r.hypotheses[0]) for r in results]
    return min(lengths), max(lengths)


def worker(args):
  rows = base.sources(args)
  if args.worker.startswith('ct2-'):
    system = Ct2System(args, rows, args.worker[len('ct2-') :])
  elif args.worker.startswith('jax-'):
    system = JaxVariantSystem(args, rows, args.worker[len('jax-') :])
  else:
    system = {'jax': base.JaxSystem, 'hf': base.HfSystem}[args.worker](args, rows)
  result = {'name': system.name, 'device': system.device, 'times': {}}
  for b in [int(b) for b in args.beams.split(',')]:
    lengths = system.run(b)  # warm-up (JAX: the compile)
    if lengths != (args.new_tokens, args.new_tokens):
      raise RuntimeError(f'{system.name} beam {b} generated {lengths} tokens, not exactly {args.new_tokens}')
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      system.run(b)
      times.append(time.perf_counter() - start)
    result['times'][str(b)] = times
  print(json.dumps(result), flush=True)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  beams = [int(b) for b in args.beams.split(',')]
  systems = args.systems.split(',')
  unknown = set(systems) - set(SYSTEMS)
  if unknown:
    sys.exit(f'unknown systems {sorted(unknown)}; expected some of {", ".join(SYSTEMS)}')
  results = []
  for system in systems:
    if system.startswith('ct2-'):
      try:
        import ctranslate2  # noqa: F401
      except ImportError:
        print(f'skipping {system}: the ctranslate2 package is not installed (pip install ".[serve]")')
        continue
    proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), f'--worker={system}', *argv],
      capture_output=True,
      text=True,
      env=hugepages.child_environ(),
      check=False,
    )
    if proc.returncode:
      sys.exit(f'{system} failed:\n{proc.stderr[-3000:]}')
    results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

  print(f'\n    python benchmarks/serve_throughput.py {" ".join(argv)}'.rstrip() + '\n')
  print(
    f'base Transformer (d_model {args.d_model}, {args.num_layers}+{args.num_layers} layers, d_ff {args.d_ff}, '
    f'{args.num_heads} heads, vocab {args.vocab}, random weights); {args.sentences} sources of {args.source_len} '
    f'tokens in one batch, exactly {args.new_tokens} new tokens each; {args.repeats} timed runs after a warm-up'
  )
  print(f'CPU: {cpu_kind()}, {os.cpu_count()} CPUs visible')
  for r in results:
    print(f'  {r["name"]}: {r["device"]}')
  print()
  labels = ['greedy' if b == 1 else f'beam {b}' for b in beams]
  print('| system | ' + ' | '.join(f'{label}: sent/s median (best)' for label in labels) + ' |')
  print('|---|' + '---|' * len(beams))
  medians = {}
  for r in results:
    cells = []
    for b in beams:
      times = r['times'][str(b)]
      medians[(r['name'], b)] = args.sentences / statistics.median(times)
      cells.append(f'{args.sentences / statistics.median(times):.1f} ({args.sentences / min(times):.1f})')
    print(f'| {r["name"]} | ' + ' | '.join(cells) + ' |')
  ours = base.JaxSystem.name
  if any(name == ours for name, _ in medians):
    print()
    for r in results:
      if r['name'] != ours:
        ratios = ', '.join(
          f'{label} {medians[(ours, b)] / medians[(r["name"], b)]:.2f}x' for b, label in zip(beams, labels)
        )
        print(f'ours / {r["name"]} (medians): {ratios}')
  print(f'\nload average (1, 5, 15 min) at the end: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
  main()
