r"""Mutation testing of the core modules: plants one small bug at a time and checks that the tests meant to guard
that code fail.

    python benchmarks/mutation.py [--only=ID,ID] [--timeout=600] [--source=head|worktree] [--out=FILE]

Each mutant is a textual replacement (one exact occurrence of `old` in one file) and the pytest selection that
should catch it. The script copies the repository once into a temporary directory (`git archive HEAD`, or the
working tree's tracked and untracked files with --source=worktree), so the checkout is never touched; in the copy it
applies a mutant, runs its tests (-x, one process), restores the file, and moves on. A mutant is
  killed    its tests fail (or time out),
  survived  they pass: the suite would not notice this bug,
  skipped   its `old` text is not in the file exactly once (the code changed: update the mutant).
A baseline run of every selection on the unmutated copy comes first: a selection that fails there makes its
mutants meaningless, and the script stops.

The score is killed / (killed + survived). The mutants are chosen by hand over what the suite promises to guard:
masks and window bounds, the decoding ring buffer, the loss and its normalisation, the learning-rate schedule, the
length penalty, the resume position, packing, gradient accumulation, dropout only in training, export flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutant:
  id: str
  path: str  # relative to the repository
  old: str
  new: str
  tests: tuple[str, ...]  # pytest arguments (files, node ids, -k expressions)
  what: str


ATTN = 'transformer_jax/model/attention.py'
RANDOM_ATTENTION = ('tests/test_attention.py', '-k', 'random or reference or key_blocks')

MUTANTS = [
  # masks and window bounds
  Mutant(
    'causal-excludes-self',
    ATTN,
    'band = q_index >= kv_index',
    'band = q_index > kv_index',
    RANDOM_ATTENTION,
    'a causal query does not see itself',
  ),
  Mutant(
    'window-one-too-wide',
    ATTN,
    'near = (q_index - kv_index < window)',
    'near = (q_index - kv_index <= window)',
    RANDOM_ATTENTION,
    'a window W sees W + 1 earlier keys',
  ),
  Mutant(
    'bidirectional-window-one-sided',
    ATTN,
    '(kv_index - q_index < (1 if causal else window))',
    '(kv_index - q_index < (1 if causal else 1))',
    RANDOM_ATTENTION,
    'a bidirectional window sees no later key',
  ),
  Mutant(
    'key-blocks-start-late',
    ATTN,
    'lo = jnp.maximum(0, (first - window + 1) // bk)',
    'lo = jnp.maximum(0, (first - window + 1) // bk + 1)',
    RANDOM_ATTENTION,
    'blockwise skips the first key block of a window band',
  ),
  Mutant(
    'key-blocks-end-early',
    ATTN,
    'hi = jnp.minimum(hi, (last + window - 1) // bk + 1)',
    'hi = jnp.minimum(hi, (last + window - 1) // bk)',
    RANDOM_ATTENTION,
    'blockwise skips the last key block of a bidirectional window band',
  ),
  Mutant(
    'splash-window-off-by-one',
    ATTN,
    'splash.LocalMask((t, s), (w - 1, w - 1), 0)',
    'splash.LocalMask((t, s), (w, w), 0)',
    ('tests/test_attention.py', '-k', 'splash'),
    "splash's bidirectional window one wider than blockwise's",
  ),
  Mutant(
    'padding-key-visible',
    ATTN,
    '& (kv_segment[:, None, :] != 0)',
    '',
    RANDOM_ATTENTION,
    'padding keys (segment 0) visible to queries of segment 0',
  ),
  # the decoding ring buffer
  Mutant(
    'ring-buffer-overwrites-last-slot',
    'transformer_jax/model/transformer.py',
    'slot = index % max_len if self.cfg.attention_window else index',
    'slot = jnp.minimum(index, max_len - 1) if self.cfg.attention_window else index',
    ('tests/test_attention.py', '-k', 'ring_buffer'),
    'the windowed cache keeps writing its last slot',
  ),
  Mutant(
    'cache-mask-misses-current',
    'transformer_jax/model/transformer.py',
    'step_mask = (jnp.arange(max_len) <= index)',
    'step_mask = (jnp.arange(max_len) < index)',
    ('tests/test_model.py', '-k', 'cached'),
    'a decoding step does not attend to its own position',
  ),
  Mutant(
    'shift-right-no-bos-per-segment',
    'transformer_jax/model/transformer.py',
    'shifted = jnp.where(targets_position == 0, bos_id, shifted)',
    'shifted = jnp.where(jnp.arange(targets.shape[1]) == 0, bos_id, shifted)',
    ('tests/test_model.py', '-k', 'shift_right or packed'),
    'a packed example starts from the previous EOS',
  ),
  # the loss and its normalisation
  Mutant(
    'label-smoothing-uses-max',
    'transformer_jax/inference/evaluation.py',
    'label_smoothing * (lse - jnp.mean(z, axis=-1))',
    'label_smoothing * (lse - jnp.max(z, axis=-1))',
    ('tests/test_train.py', '-k', 'label_smoothing'),
    'the smoothed part of the loss against the max logit, not the mean',
  ),
  Mutant(
    'loss-counts-padding',
    'transformer_jax/inference/evaluation.py',
    "return (batch['targets_segmentation'] > 0).astype(jnp.float32)",
    "return (batch['targets_segmentation'] >= 0).astype(jnp.float32)",
    ('tests/test_train.py', 'tests/test_performance.py', '-k', 'normalised or count_only'),
    'padding slots count as target tokens',
  ),
  Mutant(
    'token-count-off-by-one',
    'transformer_jax/inference/evaluation.py',
    "'weight_sum': jnp.sum(weights),",
    "'weight_sum': jnp.sum(weights) + 1.0,",
    ('tests/test_train.py', '-k', 'normalised or label_smoothing'),
    'one token too many in the denominator',
  ),
  Mutant(
    'accuracy-strict',
    'transformer_jax/inference/evaluation.py',
    'correct = target_logit >= jnp.max(z, axis=-1)',
    'correct = target_logit > jnp.max(z, axis=-1)',
    ('tests/test_train.py', 'tests/test_performance.py', '-k', 'label_smoothing or count_only'),
    'a correct prediction never counts',
  ),
  # gradient accumulation
  Mutant(
    'accumulation-keeps-last-micro-batch',
    'transformer_jax/training/train.py',
    'return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None',
    'return (jax.tree.map(lambda a, g: g, grads_acc, grads), jax.tree.map(jnp.add, sums_acc, sums)), None',
    ('tests/test_performance.py', '-k', 'grad_accumulation'),
    "only the last micro-batch's gradient is used",
  ),
  Mutant(
    'accumulation-same-dropout-every-micro-batch',
    'transformer_jax/training/train.py',
    'grad_fn(state.params, micro, jax.random.fold_in(rng, i))',
    'grad_fn(state.params, micro, rng)',
    ('tests/test_performance.py', '-k', 'grad_accumulation or dropout'),
    'every micro-batch draws the same dropout masks',
  ),
  # dropout only in training
  Mutant(
    'no-dropout-in-training',
    'transformer_jax/training/train.py',
    'micro, deterministic=False, rngs=',
    'micro, deterministic=True, rngs=',
    ('tests/test_performance.py', '-k', 'dropout'),
    'the train step never applies dropout',
  ),
  Mutant(
    'dropout-in-evaluation',
    'transformer_jax/inference/evaluation.py',
    'logits = apply_model(model, params, batch, deterministic=True)',
    "logits = apply_model(model, params, batch, deterministic=False, rngs={'dropout': jax.random.key(0)})",
    ('tests/test_performance.py', '-k', 'dropout'),
    'evaluation applies dropout',
  ),
  # the schedule
  Mutant(
    'schedule-counts-from-zero',
    'transformer_jax/training/optim.py',
    'step = jnp.maximum(jnp.asarray(count, jnp.float32) + 1.0, 1.0)',
    'step = jnp.maximum(jnp.asarray(count, jnp.float32), 1.0)',
    ('tests/test_train.py', '-k', 'schedule'),
    "the paper's step counted from 0",
  ),
  Mutant(
    'schedule-warmup-exponent',
    'transformer_jax/training/optim.py',
    'step * warmup_steps**-1.5',
    'step * warmup_steps**-1.0',
    ('tests/test_train.py', '-k', 'schedule'),
    'the warmup slope is wrong',
  ),
  Mutant(
    'cooldown-one-step-late',
    'transformer_jax/training/optim.py',
    'jnp.clip(left / cooldown_steps, 0.0, 1.0)',
    'jnp.clip((left + 1) / cooldown_steps, 0.0, 1.0)',
    ('tests/test_train.py', '-k', 'cooldown'),
    'the cooldown ends one step late',
  ),
  # decoding
  Mutant(
    'length-penalty-gnmt-constant',
    'transformer_jax/inference/decode.py',
    '((5.0 + length) / 6.0) ** alpha',
    '((6.0 + length) / 6.0) ** alpha',
    ('tests/test_decode.py', '-k', 'length_penalty or exhaustive'),
    "the GNMT penalty's constant",
  ),
  Mutant(
    'length-penalty-hf-off-by-one',
    'transformer_jax/inference/decode.py',
    "length**alpha if penalty == 'hf'",
    "(length + 1)**alpha if penalty == 'hf'",
    ('tests/test_marian_finetune.py', '-k', 'greedy_and_beam'),
    "transformers' length penalty counts one token more",
  ),
  Mutant(
    'output-limit-ignores-margin',
    'transformer_jax/inference/decode.py',
    'source_length + extra_length, max_decode_len)',
    'source_length + extra_length + 1, max_decode_len)',
    ('tests/test_decode.py', '-k', 'limit'),
    'outputs one token longer than source + 50',
  ),
  Mutant(
    'top-p-keeps-one-more',
    'transformer_jax/inference/generate.py',
    'keep_sorted = before < top_p',
    'keep_sorted = before <= top_p',
    ('tests/test_lm.py', '-k', 'top_k or top_p'),
    'nucleus sampling keeps a token past top_p',
  ),
  # packing and the resume position
  Mutant(
    'packed-positions-from-one',
    'transformer_jax/data/packing.py',
    'position.reshape(-1)[dest] = pos',
    'position.reshape(-1)[dest] = pos + 1',
    ('tests/test_data.py', '-k', 'pack'),
    'positions of a packed example start at 1',
  ),
  Mutant(
    'stream-resume-at-chunk-start',
    'transformer_jax/data/stream.py',
    "self._position, self._step = (epoch, chunk, row), int(state['step'])",
    "self._position, self._step = (epoch, chunk, 0), int(state['step'])",
    ('tests/test_streaming.py', '-k', 'resume'),
    'a resumed stream restarts its chunk',
  ),
  Mutant(
    'train-ignores-data-position',
    'transformer_jax/training/train.py',
    'data.train.set_state(data_state)',
    'data.train.set_state({**data_state, "positions": [[0, 0, 0]] * len(data_state.get("positions", []))} '
    'if "positions" in data_state else data_state)',
    ('tests/test_checkpoint.py', '-k', 'bitwise or chain'),
    'training resumes the data stream from its start',
  ),
  # the export formats' flags
  Mutant(
    'marian-scale-embedding-flag',
    'transformer_jax/export/hf_marian.py',
    "'scale_embedding': bool(cfg.scale_embeddings),",
    "'scale_embedding': not cfg.scale_embeddings,",
    ('tests/test_export.py', '-k', 'marian'),
    'HF Marian told the opposite embedding scaling',
  ),
  Mutant(
    'gpt2-attention-unscaled',
    'transformer_jax/export/hf_gpt2.py',
    "'scale_attn_weights': True",
    "'scale_attn_weights': False",
    ('tests/test_hf_gpt2.py', '-k', 'logits_and_greedy'),
    'HF GPT-2 told not to scale its attention logits',
  ),
]


def copy_repo(dest: str, source: str) -> None:
  if source == 'head':
    archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(['tar', '-x', '-C', dest], input=archive, check=True)
    return
  names = (
    subprocess.run(['git', 'ls-files', '-co', '--exclude-standard', '-z'], cwd=REPO, capture_output=True, check=True)
    .stdout.decode()
    .split('\0')
  )
  for name in filter(None, names):
    if os.path.isfile(os.path.join(REPO, name)):
      os.makedirs(os.path.dirname(os.path.join(dest, name)) or dest, exist_ok=True)
      shutil.copy2(os.path.join(REPO, name), os.path.join(dest, name))


def run_tests(copy: str, tests: tuple[str, ...], timeout: float) -> tuple[str, float, str]:
  """('passed' | 'failed' | 'timeout', seconds, last lines of output)."""
  env = dict(os.environ, PYTHONPATH=copy, JAX_PLATFORMS='cpu')
  # The copy's own compilation cache would start cold for every copy: share one across runs (keyed by program).
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'transformer_jax_mutation_cache'))
  args = [sys.executable, '-m', 'pytest', '-q', '-x', '-n', '0', '-p', 'no:cacheprovider', *tests]
  start = time.perf_counter()
  try:
    proc = subprocess.run(args, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return 'timeout', time.perf_counter() - start, ''
  tail = '\n'.join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
  status = {0: 'passed', 5: 'no tests'}.get(proc.returncode, 'failed')  # 5: the selection matched nothing
  return status, time.perf_counter() - start, tail


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help='comma-separated mutant ids')
  parser.add_argument('--timeout', type=float, default=600, help='seconds per test run')
  parser.add_argument('--source', choices=('head', 'worktree'), default='head')
  parser.add_argument('--out', default='', help='also write the results table (markdown) here')
  parser.add_argument('--no_baseline', action='store_true', help='skip the unmutated run of every selection')
  parser.add_argument('--list', action='store_true', help='print the mutants and exit')
  args = parser.parse_args()
  mutants = [m for m in MUTANTS if not args.only or m.id in args.only.split(',')]
  if args.list:
    for m in mutants:
      print(f'{m.id}: {m.path}: {m.what}  [{" ".join(m.tests)}]')
    return 0
  copy = tempfile.mkdtemp(prefix='transformer_jax_mutation_')
  rows = []
  try:
    copy_repo(copy, args.source)
    print(f'# copy of {args.source} in {copy}; {len(mutants)} mutants', flush=True)
    if not args.no_baseline:
      for tests in dict.fromkeys(m.tests for m in mutants):
        status, seconds, tail = run_tests(copy, tests, args.timeout)
        print(f'# baseline {" ".join(tests)}: {status} in {seconds:.0f} s', flush=True)
        if status != 'passed':
          print(tail, file=sys.stderr)
          return 2
    for m in mutants:
      path = os.path.join(copy, m.path)
      with open(path) as f:
        original = f.read()
      if original.count(m.old) != 1:
        rows.append((m, 'skipped', 0.0, f'`old` found {original.count(m.old)} times'))
        print(f'{m.id}: skipped ({original.count(m.old)} matches)', flush=True)
        continue
      try:
        with open(path, 'w') as f:
          f.write(original.replace(m.old, m.new))
        status, seconds, tail = run_tests(copy, m.tests, args.timeout)
      finally:
        with open(path, 'w') as f:
          f.write(original)
      verdict = {'failed': 'killed', 'timeout': 'killed (timeout)', 'passed': 'survived', 'no tests': 'no tests'}[
        status
      ]
      rows.append((m, verdict, seconds, tail.splitlines()[-1] if tail else ''))
      print(f'{m.id}: {verdict} in {seconds:.0f} s', flush=True)
  finally:
    shutil.rmtree(copy, ignore_errors=True)
  killed = sum(r[1].startswith('killed') for r in rows)
  survived = [r[0].id for r in rows if r[1] == 'survived']
  scored = killed + len(survived)
  table = ['| mutant | file | the bug | tests | result | s |', '|---|---|---|---|---|---|']
  for m, verdict, seconds, _ in rows:
    table.append(f'| {m.id} | {m.path} | {m.what} | `{" ".join(m.tests)}` | {verdict} | {seconds:.0f} |')
  summary = (
    f'score: {killed}/{scored} killed'
    + (f' ({killed / scored:.0%})' if scored else '')
    + (f'; survived: {", ".join(survived)}' if survived else '')
    + f'; skipped: {sum(r[1] == "skipped" for r in rows)}'
  )
  print('\n'.join(table) + '\n\n' + summary)
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(table) + '\n\n' + summary + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
