r"""Decoding throughput (sentences/s): our jitted greedy / beam search over the decode cache vs HF transformers'
MarianMTModel.generate on PyTorch CPU, same architecture, same work.

    python benchmarks/decode_throughput.py                      # base size, 64 x 20-token sources, 40 new tokens
    python benchmarks/decode_throughput.py --systems=jax --beams=1,4,8 --repeats=5

Both systems get the paper's base Transformer (d_model 512, 6+6 layers, d_ff 2048, 8 heads; vocabulary 8000; random
weights, float32), the same 64 random sources of 20 tokens (19 + EOS) in one batch, and are forced to generate
exactly --new_tokens tokens per sentence: ours with min_decode_len = max_decode_len = new_tokens (EOS banned, then the
length limit), HF with min_new_tokens = max_new_tokens = new_tokens. Beam search uses the same beam and length
penalty (alpha 0.6 here; HF's length_penalty is the exponent of a plain len^alpha, which does not change the work).
Both run on the CPU: HF with torch.set_num_threads(--threads), XLA with its default thread pool (one thread per core;
on the 2-core machine both use the 2 cores).

Each system runs in its own process (XLA's and PyTorch's OpenMP thread pools would otherwise fight over the cores),
one after the other. Per beam: one untimed warm-up call (for JAX: the compile), then --repeats timed calls (each
ended by block_until_ready / returning tensors); the table gives sentences/s of the median and of the best run, and
the median CPU time of a run (all threads of the process: a measure of work that other jobs on the machine disturb
less than wall time, though spinning OpenMP threads inflate it under contention).
On a machine shared with other jobs PyTorch's OpenMP threads suffer badly from preemption (runs of the same call
vary by an order of magnitude); the best run is the least disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from transformer_jax import hugepages  # noqa: E402  (no jax: workers import their system themselves)

PAD, EOS, BOS = 0, 1, 3  # transformer_jax.data.tokenizer ids, also given to the HF config


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--systems', default='jax,hf', help='comma-separated: jax, hf')
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads for HF')
  add_work_flags(p)
  return p.parse_args(argv)


def add_work_flags(p: argparse.ArgumentParser) -> None:
  """The work and the model every decoding benchmark shares (serve_throughput.py too)."""
  p.add_argument('--beams', default='1,4', help='comma-separated beam sizes; 1 = greedy')
  p.add_argument('--sentences', type=int, default=64)
  p.add_argument('--source_len', type=int, default=20, help='tokens per source, EOS included')
  p.add_argument('--new_tokens', type=int, default=40, help='exact output length (EOS disabled)')
  p.add_argument('--alpha', type=float, default=0.6)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--d_model', type=int, default=512)
  p.add_argument('--num_layers', type=int, default=6)
  p.add_argument('--d_ff', type=int, default=2048)
  p.add_argument('--num_heads', type=int, default=8)
  p.add_argument('--vocab', type=int, default=8000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)


def sources(args):
  import numpy as np

  rng = np.random.default_rng(args.seed)
  rows = rng.integers(4, args.vocab, (args.sentences, args.source_len)).astype(np.int32)
  rows[:, -1] = EOS
  return rows


class JaxSystem:
  name = 'ours (JAX, jit)'

  def __init__(self, args, rows):
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from transformer_jax.inference import decode
    from transformer_jax.model.transformer import ModelConfig, Transformer

    self.jax, self.decode, self.args = jax, decode, args
    self.cfg = ModelConfig(
      vocab_size=args.vocab,
      num_layers=args.num_layers,
      d_model=args.d_model,
      num_heads=args.num_heads,
      d_ff=args.d_ff,
      dropout_rate=0.0,
      max_len=max(args.source_len, args.new_tokens),
    )
    self.inputs = jnp.asarray(rows)
    init = jax.jit(Transformer(self.cfg).init)
    self.params = nn.meta.unbox(init(jax.random.key(args.seed), self.inputs, self.inputs)['params'])
    self.device = f'{jax.devices()[0].platform} ({len(jax.devices())} device), jax {jax.__version__}'

  def run(self, beams: int):
    n = self.args.new_tokens
    if beams == 1:
      out = self.decode.greedy_decode(self.params, self.inputs, cfg=self.cfg, max_decode_len=n, min_decode_len=n)
    else:
      out, _ = self.decode.beam_search(
        self.params,
        self.inputs,
        cfg=self.cfg,
        beam_size=beams,
        alpha=self.args.alpha,
        max_decode_len=n,
        min_decode_len=n,
      )
    out = self.jax.block_until_ready(out)
    return int((out != PAD).sum(axis=1).min()), int((out != PAD).sum(axis=1).max())


class HfSystem:
  name = 'HF MarianMTModel.generate (PyTorch)'

  def __init__(self, args, rows):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = transformers.MarianConfig(
      vocab_size=args.vocab,
      decoder_vocab_size=args.vocab,
      d_model=args.d_model,
      encoder_layers=args.num_layers,
      decoder_layers=args.num_layers,
      encoder_attention_heads=args.num_heads,
      decoder_attention_heads=args.num_heads,
      encoder_ffn_dim=args.d_ff,
      decoder_ffn_dim=args.d_ff,
      max_position_embeddings=max(512, args.source_len + args.new_tokens + 1),
      dropout=0.0,
      attention_dropout=0.0,
      activation_dropout=0.0,
      activation_function='relu',
      scale_embedding=True,
      share_encoder_decoder_embeddings=True,
      pad_token_id=PAD,
      eos_token_id=EOS,
      bos_token_id=BOS,
      decoder_start_token_id=BOS,
      forced_eos_token_id=None,
    )
    self.torch, self.args = torch, args
    self.model = transformers.MarianMTModel(config).eval()
    self.inputs = torch.as_tensor(rows, dtype=torch.long)
    self.mask = torch.ones_like(self.inputs)
    self.device = (
      f'cpu, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}'
    )

  def run(self, beams: int):
    n = self.args.new_tokens
    with self.torch.inference_mode():
      out = self.model.generate(
        input_ids=self.inputs,
        attention_mask=self.mask,
        num_beams=beams,
        do_sample=False,
        min_new_tokens=n,
        max_new_tokens=n,
        length_penalty=self.args.alpha,
        early_stopping=False,
        num_return_sequences=1,
      )
    generated = out[:, 1:]  # without the decoder start token
    lengths = (generated != PAD).sum(dim=1)
    return int(lengths.min()), int(lengths.max())


def worker(args):
  """One system in this process: warm-up + timed runs per beam; prints one JSON line."""
  rows = sources(args)
  system = {'jax': JaxSystem, 'hf': HfSystem}[args.worker](args, rows)
  result = {'name': system.name, 'device': system.device, 'times': {}, 'cpu': {}}
  for b in [int(b) for b in args.beams.split(',')]:
    lengths = system.run(b)  # warm-up (JAX: the compile)
    if lengths != (args.new_tokens, args.new_tokens):
      raise RuntimeError(f'{system.name} beam {b} generated {lengths} tokens, not exactly {args.new_tokens}')
    times, cpu = [], []
    for _ in range(args.repeats):
      start, start_cpu = time.perf_counter(), time.process_time()
      system.run(b)
      times.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
    result['times'][str(b)] = times
    result['cpu'][str(b)] = cpu
  print(json.dumps(result), flush=True)


def run_worker(script: str, system: str, argv: list[str], *extra: str) -> dict:
  """`script --worker=system` in its own process (XLA's and OpenMP's thread pools would otherwise compete for the
  cores); its last stdout line is the result, as JSON."""
  proc = subprocess.run(
    [sys.executable, os.path.abspath(script), f'--worker={system}', *extra, *argv],
    capture_output=True,
    text=True,
    env=hugepages.child_environ(),
    check=False,
  )
  if proc.returncode:
    sys.exit(f'{system} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  beams = [int(b) for b in args.beams.split(',')]
  results = []
  for system in args.systems.split(','):
    results.append(run_worker(__file__, system, argv))

  print(f'\n    python benchmarks/decode_throughput.py {" ".join(argv)}'.rstrip() + '\n')
  print(
    f'base Transformer (d_model {args.d_model}, {args.num_layers}+{args.num_layers} layers, d_ff {args.d_ff}, '
    f'{args.num_heads} heads, vocab {args.vocab}, random weights, float32); {args.sentences} sources of '
    f'{args.source_len} tokens in one batch, exactly {args.new_tokens} new tokens each; {args.repeats} timed '
    f'runs after a warm-up; {platform.machine()}, {os.cpu_count()} CPUs'
  )
  for r in results:
    print(f'  {r["name"]}: {r["device"]}')
  print()
  columns = [f'{r["name"]}: sent/s median (best); CPU s/run' for r in results]
  header = '| decoding | ' + ' | '.join(columns) + (' | ours / HF: median (best); CPU |' if len(results) == 2 else ' |')
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  for b in beams:
    medians = [args.sentences / statistics.median(r['times'][str(b)]) for r in results]
    bests = [args.sentences / min(r['times'][str(b)]) for r in results]
    cpus = [statistics.median(r['cpu'][str(b)]) for r in results]
    label = 'greedy' if b == 1 else f'beam {b}'
    cells = ' | '.join(f'{m:.1f} ({x:.1f}); {c:.2f}' for m, x, c in zip(medians, bests, cpus))
    ratio = (
      f' {medians[0] / medians[1]:.2f}x ({bests[0] / bests[1]:.2f}x); {cpus[1] / cpus[0]:.2f}x |'
      if len(results) == 2
      else ''
    )
    print(f'| {label} | {cells} |{ratio}')
  print(f'\nload average (1, 5, 15 min) at the end: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')


if __name__ == '__main__':
  main()
