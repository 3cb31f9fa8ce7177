r"""Serving throughput on CPU, one table per task: ours (float32; int8 weights and compute; with an int8 key/value
cache too; bfloat16; int8 compute in a bfloat16 model with an int8 cache), the HF model's generate() (float32), and
CTranslate2 float32 / int8 (the [serve] extra) on the same network and work.

    python benchmarks/serve_throughput.py                       # translation: base size, 64 x 20-token sources
    python benchmarks/serve_throughput.py --systems=jax,ct2-int8 --repeats=5
    python benchmarks/serve_throughput.py --task=lm             # LM generation: 16 prompts x 16 tokens, 64 new

--task=translate (sentences/s): the model and the work are benchmarks/decode_throughput.py's (its JaxSystem and
HfSystem run unchanged): the base Transformer (d_model 512, 6+6 layers, d_ff 2048, 8 heads, vocabulary 8000, random
weights), 64 random sources of 20 tokens (19 + EOS) in one batch, exactly --new_tokens tokens generated per
sentence, greedy and beam search with length penalty alpha 0.6; HF is MarianMTModel.generate. CTranslate2's
Translator is held to the same lengths with min_decoding_length = max_decoding_length = --new_tokens.

--task=lm (new tokens/s, greedy): the network and the work are benchmarks/generate_throughput.py's (its prepare,
JaxSystem and HfSystem run unchanged; its docstring says how EOS is kept out of reach), sized here like GPT-2 small
cut to CPU: 6 layers, d_model 512, 8 heads, d_ff 2048, vocabulary 8000; 16 prompts of 16 tokens (+ BOS) in one
batch, exactly 64 new tokens each. Ours is generate.generate_ids at temperature 0 (the prompt goes through the
cache one token per step); HF is GPT2LMHeadModel.generate on the hf-gpt2 export; CTranslate2's Generator gets
min_length = max_length = --new_tokens, sampling_topk=1. The outputs of every system are compared token by token
with ours float32 (the float32 systems compute the same function, so they should agree exactly).

CTranslate2 gets our model's weights through `export --format=ctranslate2`'s spec (transformer_jax/export/
ctranslate2.py); its int8 is `compute_type='int8'` (weights quantized per output channel on load, activations per
row on the fly). It runs --threads intra-op threads, as HF's torch.set_num_threads does; XLA uses its default pool.

Each system runs in its own process, one after the other: one untimed warm-up call per beam, then --repeats timed
calls; the table gives the median and the best run, then the ratios the serving goals ask for (ours fastest /
CTranslate2 int8, ours / HF float32). The CPU kind (lscpu's model name and the flags that decide which kernels run:
avx2, avx512f, avx512_vnni, avx512_bf16, amx) and the load average are printed with the table.
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

import decode_throughput as base  # noqa: E402  (translation: the model, sources, and the ours / HF systems)
import generate_throughput as lm  # noqa: E402  (LM: the network, prompts, and the ours / HF systems)

# Ours' variants: '-'-joined parts of VARIANT_PARTS (JaxVariant); ct2-<compute_type>.
SYSTEMS = ('jax', 'jax-int8', 'jax-int8-kv8', 'jax-bf16', 'jax-int8-bf16-kv8', 'hf', 'ct2-float32', 'ct2-int8')
TASKS = ('translate', 'lm')
VARIANT_PARTS = {'int8': 'int8', 'kv8': 'int8 KV cache', 'bf16': 'bf16'}
FLOAT32 = ('jax', 'hf', 'ct2-float32')
FLAGS_OF_INTEREST = ('avx2', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_bf16', 'amx_int8', 'amx_tile')
# The CPU-sized GPT-2 of --task=lm (generate_throughput's own defaults are lm_tiny's).
LM_DEFAULTS = dict(
  num_layers=6, d_model=512, num_heads=8, d_ff=2048, vocab=8000, batch=16, prompt_len=16, new_tokens=64, context=128
)


def parse_args(argv=None):
  task = argparse.ArgumentParser(add_help=False)
  task.add_argument('--task', choices=TASKS, default='translate')
  known, _ = task.parse_known_args(argv)
  p = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter, parents=[task]
  )
  p.add_argument('--systems', default=','.join(SYSTEMS), help=f'comma-separated: {", ".join(SYSTEMS)}')
  p.add_argument('--threads', type=int, default=2, help='threads for HF (torch) and CTranslate2 (intra_threads)')
  if known.task == 'lm':
    lm.add_work_flags(p)
    p.set_defaults(**LM_DEFAULTS)
    return lm.check_work(p, p.parse_args(argv))
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


def variant_model(params, cfg, variant: str):
  """(params, cfg) of ours in a variant, '-'-joined parts: 'int8' (quantize.int8_params: int8 x int8 -> int32
  matmuls, activations quantized per token), 'kv8' (model.kv_cache_dtype='int8'), 'bf16' (model.dtype=bfloat16;
  without int8 the kernels are bfloat16 too: bfloat16 x bfloat16 -> float32 matmuls). 'int8-bf16' is what
  `--quantize=int8 --config.model.dtype=bfloat16` serves."""
  import dataclasses

  import jax.numpy as jnp
  from transformer_jax.model import quantize

  parts = variant.split('-')
  unknown = set(parts) - set(VARIANT_PARTS)
  if unknown:
    raise ValueError(f'unknown variant parts {sorted(unknown)} in {variant!r}; expected {", ".join(VARIANT_PARTS)}')
  if 'int8' in parts:
    params = quantize.int8_params(params)
  elif 'bf16' in parts:
    params = quantize.cast_params(params, jnp.bfloat16)
  if 'bf16' in parts:
    cfg = dataclasses.replace(cfg, dtype=jnp.bfloat16)
  if 'kv8' in parts:
    cfg = dataclasses.replace(cfg, kv_cache_dtype='int8')
  return params, cfg


def variant_name(variant: str) -> str:
  return 'ours ' + ' + '.join(VARIANT_PARTS[part] for part in variant.split('-'))


class JaxVariantSystem(base.JaxSystem):
  """Ours (translation) in a variant (variant_model)."""

  def __init__(self, args, rows, variant: str):
    super().__init__(args, rows)
    self.params, self.cfg = variant_model(self.params, self.cfg, variant)
    self.name = variant_name(variant)


class LmVariantSystem(lm.JaxSystem):
  """Ours (LM generation) in a variant (variant_model)."""

  def __init__(self, args, rows, variant: str):
    super().__init__(args, rows)
    self.params, self.cfg = variant_model(self.params, self.cfg, variant)
    self.name = variant_name(variant)


def ct2_model(cfg, params, tokens: list[str]) -> tempfile.TemporaryDirectory:
  """A directory CTranslate2 loads, written from our cfg and float32 params by the ctranslate2 exporter's spec."""
  import jax
  import ml_collections
  import numpy as np
  from transformer_jax.export import Exportable
  from transformer_jax.export import ctranslate2 as ct2_export

  source = Exportable(
    config=ml_collections.ConfigDict(), cfg=cfg, params=jax.tree.map(np.asarray, params), tokenizer_path='', step=0
  )
  spec = ct2_export.model_spec(source, tokens)
  spec.validate()
  spec.optimize(quantization='float32')
  directory = tempfile.TemporaryDirectory()
  spec.save(directory.name)
  return directory


def ct2_tokens(vocab: int) -> list[str]:
  return ['<pad>', '</s>', '<unk>', '<s>'] + [f't{i}' for i in range(4, vocab)]


def ct2_device(args, compute_type: str) -> str:
  import ctranslate2

  return f'cpu, ctranslate2 {ctranslate2.__version__} ({args.threads} threads, compute_type={compute_type})'


class Ct2System:
  """CTranslate2's Translator on our translation model's weights (the export's spec), float32 or int8."""

  def __init__(self, args, rows, compute_type: str):
    import ctranslate2

    tokens = ct2_tokens(args.vocab)
    ours = base.JaxSystem(args, rows)  # the same random weights as ours (same seed)
    self.directory = ct2_model(ours.cfg, ours.params, tokens)
    del ours
    self.translator = ctranslate2.Translator(
      self.directory.name, device='cpu', compute_type=compute_type, intra_threads=args.threads, inter_threads=1
    )
    self.sources = [[tokens[t] for t in row if t != base.EOS] for row in rows]  # the model appends EOS itself
    self.args, self.name = args, f'CTranslate2 {compute_type}'
    self.device = ct2_device(args, compute_type)

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


class Ct2GeneratorSystem:
  """CTranslate2's Generator on our LM's weights (generate_throughput's params file), float32 or int8, greedy."""

  def __init__(self, args, rows, compute_type: str):
    import ctranslate2
    from flax import serialization

    with open(os.path.join(args.dir, 'params.msgpack'), 'rb') as f:
      params = serialization.msgpack_restore(f.read())
    tokens = ct2_tokens(args.vocab)
    self.directory = ct2_model(lm.model_cfg(args), params, tokens)
    self.generator = ctranslate2.Generator(
      self.directory.name, device='cpu', compute_type=compute_type, intra_threads=args.threads, inter_threads=1
    )
    self.prompts = [[tokens[t] for t in row] for row in rows]  # BOS included, as ours and HF get it
    self.args, self.name = args, f'CTranslate2 Generator {compute_type}'
    self.device = ct2_device(args, compute_type)

  def run(self):
    n = self.args.new_tokens
    results = self.generator.generate_batch(
      self.prompts,
      max_length=n,
      min_length=n,
      sampling_topk=1,
      beam_size=1,
      include_prompt_in_result=False,
      max_batch_size=0,
    )
    return [list(r.sequences_ids[0]) for r in results]


def worker(args):
  if args.task == 'lm':
    return lm_worker(args)
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


def lm_worker(args):
  if args.worker == 'prepare':
    return lm.prepare(args)
  rows = lm.prompts(args)
  if args.worker.startswith('ct2-'):
    system = Ct2GeneratorSystem(args, rows, args.worker[len('ct2-') :])
  elif args.worker.startswith('jax-'):
    system = LmVariantSystem(args, rows, args.worker[len('jax-') :])
  else:
    system = {'jax': lm.JaxSystem, 'hf': lm.HfSystem}[args.worker](args, rows)
  result = lm.measure(system, args)
  result['times'] = {'1': result['times']}  # greedy only, keyed by beam as translation's are
  print(json.dumps(result), flush=True)


def run_worker(system: str, argv: list[str], *extra: str) -> dict:
  return base.run_worker(__file__, system, argv, *extra)


def table(results: list[dict], beams: list[int], per_run: int, unit: str) -> dict:
  """Prints the table (per_run units of work per call: median and best run) and returns the medians by (name, beam)."""
  labels = ['greedy' if b == 1 else f'beam {b}' for b in beams]
  print('| system | ' + ' | '.join(f'{label}: {unit} median (best)' for label in labels) + ' |')
  print('|---|' + '---|' * len(beams))
  medians = {}
  for r in results:
    cells = []
    for b in beams:
      times = r['times'][str(b)]
      medians[(r['system'], b)] = per_run / statistics.median(times)
      cells.append(f'{per_run / statistics.median(times):,.1f} ({per_run / min(times):,.1f})')
    print(f'| {r["name"]} | ' + ' | '.join(cells) + ' |')
  return medians


def goals(results: list[dict], medians: dict, beams: list[int]) -> None:
  """The ratios the serving goals ask for, on medians: ours (float32 and fastest) over HF float32, and ours fastest
  and each of ours over CTranslate2 int8."""
  names = {r['system']: r['name'] for r in results}
  ours = [s for s in names if s == 'jax' or s.startswith('jax-')]
  print()
  for b in beams:
    label = 'greedy' if b == 1 else f'beam {b}'
    if not ours:
      break
    fastest = max(ours, key=lambda s: medians[(s, b)])
    print(f'{label}: ours fastest is {names[fastest]} ({medians[(fastest, b)]:,.1f})')
    for other, goal in (('hf', 1.5), ('ct2-int8', 1.0)):
      if other not in names:
        continue
      ratios = ', '.join(f'{names[s]} {medians[(s, b)] / medians[(other, b)]:.2f}x' for s in ours)
      best = medians[(fastest, b)] / medians[(other, b)]
      verdict = 'met' if best >= goal else 'not met'
      print(f'  / {names[other]}: {ratios}; fastest {best:.2f}x (goal >= {goal}x: {verdict})')


def agreement(results: list[dict]) -> None:
  """Each system's generated tokens against ours float32's (LM: every system returns its tokens)."""
  reference = next((r for r in results if r['system'] == 'jax'), None)
  if reference is None:
    return
  ref = reference['tokens']
  total = sum(len(row) for row in ref)
  print()
  for r in results:
    if r is reference:
      continue
    same = sum(x == y for ra, rb in zip(ref, r['tokens']) for x, y in zip(ra, rb))
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(ref, r['tokens'])]
    diverged = [i for i in first if i is not None]
    where = f'; {len(diverged)} of {len(ref)} rows diverge, the first at new token {min(diverged)}' if diverged else ''
    kind = ' (float32: should be equal)' if r['system'] in FLOAT32 else ''
    print(
      f'tokens equal to ours float32: {r["name"]}{kind}: {"yes" if r["tokens"] == ref else "NO"}, '
      f'{same} of {total} ({same / total:.1%}){where}'
    )
  print(f'distinct token ids in ours float32: {len({t for row in ref for t in row})}')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  beams = [1] if args.task == 'lm' else [int(b) for b in args.beams.split(',')]
  systems = args.systems.split(',')
  unknown = set(systems) - set(SYSTEMS)
  if unknown:
    sys.exit(f'unknown systems {sorted(unknown)}; expected some of {", ".join(SYSTEMS)}')
  try:
    import ctranslate2  # noqa: F401
  except ImportError:
    skipped = [s for s in systems if s.startswith('ct2-')]
    if skipped:
      print(f'skipping {", ".join(skipped)}: the ctranslate2 package is not installed (pip install ".[serve]")')
    systems = [s for s in systems if s not in skipped]
  load_before = os.getloadavg()
  results = []
  with tempfile.TemporaryDirectory(prefix='serve_throughput_') as directory:
    if args.task == 'lm':
      eos = run_worker('prepare', argv, f'--dir={directory}')
    for system in systems:
      extra = [f'--dir={directory}'] if args.task == 'lm' else []
      results.append(dict(run_worker(system, argv, *extra), system=system))

  print(f'\n    python benchmarks/serve_throughput.py {" ".join(argv)}'.rstrip() + '\n')
  if args.task == 'lm':
    per_run, unit = args.batch * args.new_tokens, 'new tok/s'
    print(
      f'decoder-only LM, GPT-2 architecture ({args.num_layers} layers, d_model {args.d_model}, {args.num_heads} '
      f'heads, d_ff {args.d_ff}, vocab {args.vocab}, context {args.context}; random weights); {args.batch} prompts '
      f'of {args.prompt_len} tokens (+ BOS) in one batch, greedy, exactly {args.new_tokens} new tokens each (EOS '
      f'logit {eos["eos_logit"]:.0f}, others within +-{eos["other_logits_bound"]:.0f}); {args.repeats} timed runs '
      'after a warm-up'
    )
  else:
    per_run, unit = args.sentences, 'sent/s'
    print(
      f'base Transformer (d_model {args.d_model}, {args.num_layers}+{args.num_layers} layers, d_ff {args.d_ff}, '
      f'{args.num_heads} heads, vocab {args.vocab}, random weights); {args.sentences} sources of {args.source_len} '
      f'tokens in one batch, exactly {args.new_tokens} new tokens each; {args.repeats} timed runs after a warm-up'
    )
  print(f'CPU: {cpu_kind()}, {os.cpu_count()} CPUs visible')
  for r in results:
    print(f'  {r["name"]}: {r["device"]}')
  print()
  medians = table(results, beams, per_run, unit)
  goals(results, medians, beams)
  if args.task == 'lm':
    agreement(results)
  load = ', '.join(f'{x:.2f}' for x in load_before), ', '.join(f'{x:.2f}' for x in os.getloadavg())
  print(f'\nload average (1, 5, 15 min): {load[0]} at the start, {load[1]} at the end')


if __name__ == '__main__':
  main()
