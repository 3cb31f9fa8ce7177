r"""Generation throughput (new tokens/s): our jitted greedy sampling over the KV cache (generate.generate_ids,
temperature 0) vs HF transformers' GPT2LMHeadModel.generate on PyTorch CPU, the same network, the same work.

    python benchmarks/generate_throughput.py                        # lm_tiny's size, 8 prompts x 16 tokens, 64 new
    python benchmarks/generate_throughput.py --batch=32 --new_tokens=96 --repeats=5 --systems=jax

The network is configs/lm_tiny.py's architecture (GPT-2's choices: pre-norm, learned positions, tanh GELU, biases,
final LayerNorm, tied embeddings; by default 4 layers, d_model 128, 4 heads, d_ff 512, vocabulary 2048, context 128;
the flags change the sizes) with random float32 parameters: a fresh init plus --noise x N(0, 1) on every leaf (so
biases and norms are not trivial and logits are not near-ties). They are written once, as our msgpack tree and as
the hf-gpt2 exporter's GPT-2 tensors and config (export.hf_gpt2.to_gpt2_state_dict / gpt2_config, the functions
`export --format=hf-gpt2` writes with; no tokenizer is needed here), so both sides compute the same function: the
greedy outputs are compared token by token and the result printed.

Both see the same --batch random prompts of --prompt_len tokens (after BOS, in one batch) and must generate exactly
--new_tokens tokens per row. A forced length without an early EOS:
  * ours: generate.generate_ids has no minimum length, so the random weights are made to never pick EOS: the final
    LayerNorm's scale is set to a constant g and its bias b shifted to mean beta > 0, and EOS's (tied) embedding
    row to -c * (1, ..., 1). The normalised hidden state n sums to 0 over d_model, so EOS's logit is exactly
    -c (g sum(n) + sum(b)) = -c beta D, while every other logit is at most (g sqrt(D) + |b|) max_v |w_v| in size;
    c is chosen to put EOS's below all of them (EOS never appears as an input, so its embedding is never read).
  * HF: suppress_tokens=[PAD, BOS, EOS] (ours never samples PAD or BOS either: generate.filter_logits), so
    generate() never stops early; its outputs are checked to be exactly --new_tokens long.
A difference in the work that remains: ours feeds the prompt through the cache one token per step (generate_ids has
no prefill), HF runs the prompt in one forward pass. That is what a user of each gets.

Each system runs in its own process (XLA's and PyTorch's thread pools would otherwise fight over the cores), one after
the other: HF with torch.set_num_threads(--threads), XLA with its default thread pool (one per core). One untimed
warm-up call (JAX: the compile), then --repeats timed calls (ended by block_until_ready / returned tensors); the table
gives new tokens/s (batch x new_tokens / wall time) of the median and of the best run, and the median CPU time of a
run (all threads of the process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
  sys.path.insert(0, _REPO)

from transformer_jax import hugepages  # noqa: E402  (no jax: workers import their system themselves)

PAD, EOS, BOS = 0, 1, 3  # transformer_jax.model.vocab.DEFAULT_SPECIAL_IDS, also in the exported GPT-2 config


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--systems', default='jax,hf', help='comma-separated: jax, hf')
  p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads for HF')
  add_work_flags(p)
  return check_work(p, p.parse_args(argv))


def add_work_flags(p: argparse.ArgumentParser) -> None:
  """The network and the work (shared with serve_throughput.py --task=lm)."""
  p.add_argument('--batch', type=int, default=8, help='prompts in one batch')
  p.add_argument('--prompt_len', type=int, default=16, help='prompt tokens after BOS')
  p.add_argument('--new_tokens', type=int, default=64, help='exact number of generated tokens per row')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--num_layers', type=int, default=4)
  p.add_argument('--d_model', type=int, default=128)
  p.add_argument('--num_heads', type=int, default=4)
  p.add_argument('--d_ff', type=int, default=512)
  p.add_argument('--vocab', type=int, default=2048)
  p.add_argument('--context', type=int, default=128, help='model.max_len (learned positions)')
  p.add_argument('--noise', type=float, default=0.2, help='std of the noise added to the fresh init')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--worker', default='', help=argparse.SUPPRESS)
  p.add_argument('--dir', default='', help=argparse.SUPPRESS)


def check_work(p: argparse.ArgumentParser, args):
  if 1 + args.prompt_len + args.new_tokens > args.context:
    p.error(f'1 + prompt_len + new_tokens = {1 + args.prompt_len + args.new_tokens} exceeds the context {args.context}')
  return args


def model_cfg(args):
  from configs import lm_tiny
  from transformer_jax.model.transformer import ModelConfig

  config = lm_tiny.get_config()
  config.model.update(
    vocab_size=args.vocab,
    num_layers=args.num_layers,
    d_model=args.d_model,
    num_heads=args.num_heads,
    d_ff=args.d_ff,
    dropout_rate=0.0,
    dtype='float32',
  )
  return ModelConfig.from_config(config.model, max_len=args.context)


def prompts(args):
  """[batch, 1 + prompt_len]: BOS then random ordinary tokens (never PAD/EOS/UNK/BOS)."""
  import numpy as np

  rows = np.random.default_rng(args.seed).integers(4, args.vocab, (args.batch, 1 + args.prompt_len)).astype(np.int32)
  rows[:, 0] = BOS
  return rows


def prepare(args):
  """Random parameters that never pick EOS (module docstring) -> DIR/params.msgpack and DIR/hf (GPT-2)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import linen as nn
  from flax import serialization
  from transformer_jax.export import files
  from transformer_jax.export import hf_gpt2
  from transformer_jax.export.safetensors import write_safetensors
  from transformer_jax.model.transformer import LanguageModel

  cfg = model_cfg(args)
  model = LanguageModel(cfg)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(args.seed), jnp.ones((1, 8), jnp.int32))['params'])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(args.seed + 1), len(leaves))
  params = jax.tree.unflatten(
    tree, [np.array(x + args.noise * jax.random.normal(k, x.shape), np.float32) for x, k in zip(leaves, keys)]
  )
  d = cfg.d_model
  norm = params['decoder']['final_norm']
  gain, beta = 1.0, 1.0
  norm['scale'] = np.full(d, gain, np.float32)
  norm['bias'] = (norm['bias'] - norm['bias'].mean() + beta).astype(np.float32)
  wte = params['embedding']['embedding']
  others = np.delete(wte, EOS, axis=0)
  bound = (gain * np.sqrt(d) + np.linalg.norm(norm['bias'])) * np.linalg.norm(others, axis=1).max()
  c = (2.0 * bound + 10.0) / (beta * d)  # EOS logit = -c beta D = -(2 bound + 10) < -bound <= any other logit
  wte[EOS] = -c
  with open(os.path.join(args.dir, 'params.msgpack'), 'wb') as f:
    f.write(serialization.msgpack_serialize(params))
  hf_dir = os.path.join(args.dir, 'hf')
  os.makedirs(hf_dir)
  write_safetensors(
    os.path.join(hf_dir, 'model.safetensors'), hf_gpt2.to_gpt2_state_dict(params, cfg), {'format': 'pt'}
  )
  files.write_json(os.path.join(hf_dir, 'config.json'), hf_gpt2.gpt2_config(cfg))
  print(json.dumps({'eos_logit': float(-c * beta * d), 'other_logits_bound': float(bound)}), flush=True)


class JaxSystem:
  name = 'ours (JAX, jit, generate_ids)'

  def __init__(self, args, rows):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import serialization
    from transformer_jax.inference import generate

    self.jax, self.generate, self.args = jax, generate, args
    self.cfg = model_cfg(args)
    with open(os.path.join(args.dir, 'params.msgpack'), 'rb') as f:
      self.params = jax.device_put(serialization.msgpack_restore(f.read()))
    seq = np.full((args.batch, 1 + args.prompt_len + args.new_tokens), PAD, np.int32)
    seq[:, : rows.shape[1]] = rows
    self.seq = jnp.asarray(seq)
    self.lengths = jnp.full((args.batch,), args.prompt_len, jnp.int32)
    self.device = f'{jax.devices()[0].platform} ({len(jax.devices())} device), jax {jax.__version__}'

  def run(self):
    out = self.generate.generate_ids(
      self.params,
      self.seq,
      self.lengths,
      self.jax.random.key(0),
      self.jax.numpy.float32(0.0),
      self.jax.numpy.float32(1.0),
      self.jax.numpy.int32(self.args.new_tokens),
      cfg=self.cfg,
      top_k=0,
    )
    out = self.jax.device_get(self.jax.block_until_ready(out))
    return out[:, 1 + self.args.prompt_len :].tolist()


class HfSystem:
  name = 'HF GPT2LMHeadModel.generate (PyTorch)'

  def __init__(self, args, rows):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    self.torch, self.args = torch, args
    self.model = transformers.GPT2LMHeadModel.from_pretrained(
      os.path.join(args.dir, 'hf'), dtype=torch.float32, local_files_only=True
    ).eval()
    self.inputs = torch.as_tensor(rows, dtype=torch.long)
    self.mask = torch.ones_like(self.inputs)
    self.device = (
      f'cpu, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}'
    )

  def run(self):
    n = self.args.new_tokens
    with self.torch.inference_mode():
      out = self.model.generate(
        input_ids=self.inputs,
        attention_mask=self.mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=n,
        suppress_tokens=[PAD, BOS, EOS],
        pad_token_id=PAD,
        eos_token_id=EOS,
        use_cache=True,
      )
    return out[:, self.inputs.shape[1] :].tolist()


def worker(args):
  """One system in this process: a warm-up, then timed runs; prints one JSON line (times and the outputs)."""
  if args.worker == 'prepare':
    return prepare(args)
  rows = prompts(args)
  system = {'jax': JaxSystem, 'hf': HfSystem}[args.worker](args, rows)
  print(json.dumps(measure(system, args)), flush=True)


def measure(system, args) -> dict:
  """A warm-up call (JAX: the compile), then --repeats timed calls of system.run(), which returns the new tokens per
  row; checks that every row got exactly --new_tokens tokens, no EOS, and the same tokens every time."""
  tokens = system.run()
  lengths = {len([t for t in row if t != PAD]) for row in tokens}
  if lengths != {args.new_tokens} or any(EOS in row for row in tokens):
    raise RuntimeError(f'{system.name} generated {sorted(lengths)} tokens per row, not exactly {args.new_tokens}')
  times, cpu = [], []
  for _ in range(args.repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    again = system.run()
    times.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
    if again != tokens:
      raise RuntimeError(f'{system.name}: greedy output changed between runs')
  return {
    'name': system.name,
    'device': system.device,
    'times': times,
    'cpu': cpu,
    'tokens': tokens,
    'threads': getattr(getattr(system, 'torch', None), 'get_num_threads', lambda: None)(),
  }


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _subprocess(name: str, argv: list[str], directory: str) -> dict:
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), f'--worker={name}', f'--dir={directory}', *argv],
    capture_output=True,
    text=True,
    env=hugepages.child_environ(),
    check=False,
  )
  if proc.returncode:
    sys.exit(f'error: {name} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  systems = {s.strip() for s in args.systems.split(',') if s.strip()}
  if not systems or systems - {'jax', 'hf'}:
    sys.exit(f'error: --systems must name jax and/or hf, got {args.systems!r}')
  systems = [s for s in ('jax', 'hf') if s in systems]  # ours first: the ratio column is ours / HF
  with tempfile.TemporaryDirectory(prefix='generate_throughput_') as directory:
    eos = _subprocess('prepare', argv, directory)
    # Each system in its own process: XLA's and OpenMP's thread pools would otherwise compete for the cores.
    results = [_subprocess(s, argv, directory) for s in systems]

  new = args.batch * args.new_tokens
  print(f'\n    python benchmarks/generate_throughput.py {" ".join(argv)}'.rstrip() + '\n')
  print(
    f'decoder-only LM, GPT-2 architecture (lm_tiny: {args.num_layers} layers, d_model {args.d_model}, '
    f'{args.num_heads} heads, d_ff {args.d_ff}, vocab {args.vocab}, context {args.context}; random weights, '
    f'float32); {args.batch} prompts of {args.prompt_len} tokens (+ BOS) in one batch, greedy, exactly '
    f'{args.new_tokens} new tokens each (EOS logit {eos["eos_logit"]:.0f}, others within '
    f'+-{eos["other_logits_bound"]:.0f}; HF: suppress_tokens); {args.repeats} timed runs after a warm-up'
  )
  print(f'CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()}')
  for r in results:
    print(f'  {r["name"]}: {r["device"]}')
  if len(results) == 2:
    a, b = results[0]['tokens'], results[1]['tokens']
    differ = sum(x != y for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    first = [next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), None) for ra, rb in zip(a, b)]
    diverged = [i for i in first if i is not None]
    print(
      f'greedy outputs equal: {"yes" if a == b else "NO"} ({differ} of {new} tokens differ'
      + (f'; first divergence at new token {min(diverged)}' if diverged else '')
      + f'; {len({t for row in a for t in row})} distinct token ids in ours)'
    )
  print()
  columns = [f'{r["name"]}: new tok/s median (best); CPU s/run' for r in results]
  header = (
    '| generation | ' + ' | '.join(columns) + (' | ours / HF: median (best); CPU |' if len(results) == 2 else ' |')
  )
  print(header)
  print('|' + '---|' * (header.count('|') - 1))
  medians = [new / statistics.median(r['times']) for r in results]
  bests = [new / min(r['times']) for r in results]
  cpus = [statistics.median(r['cpu']) for r in results]
  cells = ' | '.join(f'{m:,.0f} ({x:,.0f}); {c:.2f}' for m, x, c in zip(medians, bests, cpus))
  ratio = (
    f' {medians[0] / medians[1]:.2f}x ({bests[0] / bests[1]:.2f}x); {cpus[1] / cpus[0]:.2f}x |'
    if len(results) == 2
    else ''
  )
  print(f'| greedy, batch {args.batch}, {args.prompt_len} + {args.new_tokens} tokens | {cells} |{ratio}')
  threads = [r['threads'] for r in results if r.get('threads')]
  print(
    f'\ntorch threads: {threads[0] if threads else "n/a"}; XLA: its default pool; '
    f'load average (1, 5, 15 min) at the end: {", ".join(f"{x:.2f}" for x in os.getloadavg())}'
  )


if __name__ == '__main__':
  main()
