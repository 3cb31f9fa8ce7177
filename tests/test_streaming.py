"""Prepared shards (data/prepare.py) and the training stream over them (data/stream.py)."""

from __future__ import annotations

import collections
import json
import os
import shutil
import tracemalloc

import ml_collections
import numpy as np
import pytest

from transformer_jax.data import packing
from transformer_jax.data import prepare
from transformer_jax.data import stream as stream_lib
from transformer_jax.data.tokenizer import EOS_ID
import helpers

NUM_PAIRS = 3000
MAX_LENGTH = 64


def write_corpus(directory, pairs: int, seed: int = 0, extra_en: list[bytes] = (), extra_de: list[bytes] = ()):
  """WMT-shaped toy text: Zipf words, lognormal sentence lengths; optional extra raw lines appended."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  for lang, extra in (('en', extra_en), ('de', extra_de)):
    words = np.array([''.join(rng.choice(list('abcdefghij'), rng.integers(2, 7))) for _ in range(300)])
    p = 1.0 / np.arange(1, 301) ** 1.1
    p /= p.sum()
    lens = np.clip(np.rint(rng.lognormal(2.0, 0.5, pairs)), 1, 20).astype(int)
    lines = [' '.join(rng.choice(words, n, p=p)).encode() for n in lens] + list(extra)
    with open(os.path.join(directory, f'train.{lang}'), 'wb') as f:
      f.write(b'\n'.join(lines) + b'\n')


def make_config(corpus_dir, **overrides):
  c = ml_collections.ConfigDict()
  c.dataset = f'text:{corpus_dir}'
  c.source_lang, c.target_lang = 'en', 'de'
  c.train_split, c.eval_split = 'train', 'validation'
  c.max_train_examples = None
  c.data_dir = None
  c.model = ml_collections.ConfigDict({'vocab_size': 256})
  c.max_length = MAX_LENGTH
  c.tokenizer_train_sentences = 2000
  c.prepared_data_dir = None
  c.update(overrides)
  return c


def shard_bytes(directory) -> dict[str, bytes]:
  return {name: open(os.path.join(directory, name), 'rb').read() for name in sorted(os.listdir(directory))}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp('corpus')
  write_corpus(str(root / 'text'), NUM_PAIRS)
  return str(root / 'text')


@pytest.fixture(scope='module')
def prepared(corpus, tmp_path_factory):
  """One preparation in several shards (700 examples each); module-wide."""
  workdir = str(tmp_path_factory.mktemp('workdir'))
  mp = pytest.MonkeyPatch()
  mp.setattr(prepare, 'SHARD_EXAMPLES', 700)
  try:
    got = prepare.ensure_prepared(make_config(corpus), workdir, progress=False)
  finally:
    mp.undo()
  return workdir, got


# ---------------------------------------------------------------------------------------------------------------------
# Preparation


def test_prepare_is_deterministic_and_complete(prepared, corpus, tmp_path, monkeypatch):
  workdir, first = prepared
  m = first.manifest
  assert not first.reused and m['num_examples'] == NUM_PAIRS and m['pairs_read'] == NUM_PAIRS
  assert len(m['shards']) == -(-NUM_PAIRS // 700) and m['dtype'] == 'uint16'
  assert sum(s['num_examples'] for s in m['shards']) == NUM_PAIRS
  # Every example: the tokenizer's ids + EOS, in corpus order.
  shards = stream_lib.Shards(first.directory)
  lines = open(os.path.join(corpus, 'train.en'), encoding='utf-8').read().splitlines()
  for i in (0, 699, 700, NUM_PAIRS - 1):
    src, _ = shards.examples([i])[0]
    assert src == first.tokenizer.encode(lines[i]) + [EOS_ID]
  # A second preparation from the same input (same tokenizer file) in another workdir: the same bytes.
  other = str(tmp_path / 'other')
  os.makedirs(other)
  shutil.copy2(os.path.join(workdir, 'spm.model'), other)
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 700)
  second = prepare.ensure_prepared(make_config(corpus), other, progress=False)
  assert not second.reused
  assert os.path.basename(second.directory) == os.path.basename(first.directory)
  assert shard_bytes(second.directory) == shard_bytes(first.directory)
  again = prepare.ensure_prepared(make_config(corpus), other, progress=False)
  assert again.reused and again.manifest == second.manifest


@pytest.mark.parametrize('damage', ['no_manifest', 'flipped_byte', 'truncated', 'missing_shard', 'killed'])
def test_incomplete_or_damaged_preparation_is_redone_never_used(prepared, corpus, tmp_path, monkeypatch, damage):
  workdir, first = prepared
  want = shard_bytes(first.directory)
  work = str(tmp_path / 'w')
  shutil.copytree(workdir, work)
  directory = os.path.join(work, 'data', os.path.basename(first.directory))
  shard = os.path.join(directory, 'shard-00002-targets.npy')
  monkeypatch.setattr(prepare, 'SHARD_EXAMPLES', 700)
  if damage == 'no_manifest':  # killed after the shards, before the manifest
    os.remove(os.path.join(directory, prepare.MANIFEST))
  elif damage == 'flipped_byte':
    data = bytearray(open(shard, 'rb').read())
    data[-3] ^= 0x01
    open(shard, 'wb').write(bytes(data))
  elif damage == 'truncated':
    os.truncate(shard, os.path.getsize(shard) // 2)
  elif damage == 'missing_shard':
    os.remove(shard)
  else:  # a preparation that dies half-way leaves shards and temporary files, never a manifest
    shutil.rmtree(directory)
    calls = []
    real = prepare._save_npy

    def dying(directory_, name, array):
      calls.append(name)
      if len(calls) == 7:
        open(os.path.join(directory_, name + '.tmp-1-1'), 'wb').write(b'half')
        raise KeyboardInterrupt('killed')
      return real(directory_, name, array)

    monkeypatch.setattr(prepare, '_save_npy', dying)
    with pytest.raises(KeyboardInterrupt):
      prepare.ensure_prepared(make_config(corpus), work, progress=False)
    monkeypatch.setattr(prepare, '_save_npy', real)
    assert os.listdir(directory) and not os.path.exists(os.path.join(directory, prepare.MANIFEST))
  assert prepare.read_manifest(directory) is None  # never used as it is
  redone = prepare.ensure_prepared(make_config(corpus), work, progress=False)
  assert not redone.reused and redone.directory == directory
  assert shard_bytes(directory) == want


def test_bad_data_is_counted_and_reported(tmp_path):
  d = str(tmp_path / 'bad')
  long_line = ' '.join(['abcdefghij'] * 80).encode()
  extra_en = [b'\xff\xfe broken', b'ok here', b'', b'fine', long_line, b'   ']
  extra_de = [b'gut', b'\xc3\x28 kaputt', b'leer', b'', b'lang', b'x']
  write_corpus(d, 500, seed=1, extra_en=extra_en, extra_de=extra_de)
  workdir = str(tmp_path / 'w')
  got = prepare.ensure_prepared(make_config(d), workdir, progress=False)
  m = got.manifest
  assert m['skipped'] == {'not_utf8': 2, 'empty': 3, 'too_long': 1}
  assert m['pairs_read'] == 506 and m['num_examples'] == 500
  lines = prepare.report_skipped(m, 'bad')
  assert len(lines) == 3
  assert 'skipped 2 of 506 pairs: a side is not UTF-8' in lines[0]
  assert 'skipped 3 of 506 pairs: a side is empty' in lines[1]
  assert f'max_length={MAX_LENGTH}' in lines[2]
  # Mismatched line counts: one clear error before any tokenizer training or tokenizing.
  with open(os.path.join(d, 'train.de'), 'ab') as f:
    f.write(b'one more\n')
  fresh = str(tmp_path / 'fresh')
  with pytest.raises(ValueError, match=r'has 506 lines but .* has 507'):
    prepare.ensure_prepared(make_config(d), fresh, progress=False)
  assert not os.path.exists(os.path.join(fresh, 'spm.model'))


def test_prepare_cli_error_line_and_summary(tmp_path, corpus):
  d = str(tmp_path / 'uneven')
  os.makedirs(d)
  open(os.path.join(d, 'train.en'), 'w').write('a\nb\nc\n')
  open(os.path.join(d, 'train.de'), 'w').write('a\nb\n')
  run = helpers.cli('prepare', f'--workdir={tmp_path / "w"}', f'--config.dataset=text:{d}')
  assert run.returncode == 1, run.stderr
  assert 'error: text dataset:' in run.stderr and 'has 3 lines but' in run.stderr
  assert 'Traceback' not in run.stderr


# ---------------------------------------------------------------------------------------------------------------------
# The stream


@pytest.mark.parametrize('n', [1, 2, 3, 5, 64, 1000, 4097])
def test_index_shuffle_is_a_permutation(n):
  perms = [stream_lib.IndexShuffle(n, seed, epoch)(np.arange(n)) for seed, epoch in ((0, 0), (0, 1), (1, 0))]
  for p in perms:
    assert sorted(p.tolist()) == list(range(n))
  if n >= 64:
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[0], perms[2])
    assert abs(np.corrcoef(np.arange(n), perms[0])[0, 1]) < 0.2  # not close to the identity


def as_multiset(examples):
  return collections.Counter((tuple(s), tuple(t)) for s, t in examples)


def make_stream(got, **kw):
  args = dict(batch_size=4, inputs_length=96, targets_length=96, seed=3, chunk_examples=500)
  args.update(kw)
  return stream_lib.TrainStream(stream_lib.Shards(got.directory, got.manifest), **args)


@pytest.mark.parametrize('processes', [1, 2])
def test_an_epoch_holds_every_example_exactly_once(prepared, processes):
  _, got = prepared
  everything = as_multiset(stream_lib.Shards(got.directory).examples(np.arange(NUM_PAIRS)))
  firsts = []
  for epoch in (0, 1):
    total = collections.Counter()
    for p in range(processes):
      s = make_stream(got, process_index=p, process_count=processes, prefetch=0)
      assert s.chunks_per_epoch == -(-s.num_examples // 500) >= 3
      unpacked = [ex for rows in s.epoch_rows(epoch) for ex in packing.unpack_examples(rows)]
      assert len(unpacked) == s.num_examples
      total += as_multiset(unpacked)
      if p == 0:
        firsts.append([ex[0] for ex in unpacked[:50]])
    assert total == everything  # each epoch: disjoint over the processes and covering (as multisets)
  assert firsts[0] != firsts[1]  # another order every epoch
  # The shuffle is global: the first chunk draws from the whole corpus.
  idx = make_stream(got, prefetch=0).chunk_indices(0, 0)
  assert idx.min() < NUM_PAIRS * 0.1 and idx.max() > NUM_PAIRS * 0.9


def take(it, k):
  return [next(it) for _ in range(k)]


def same(a, b):
  return len(a) == len(b) and all(
    x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
  )


def test_resume_gives_the_same_next_batches(prepared):
  _, got = prepared
  s = make_stream(got)
  rows_per_epoch = sum(r['inputs'].shape[0] for r in s.epoch_rows(0))
  per_epoch = rows_per_epoch // 4
  straight = take(make_stream(got), 2 * per_epoch + 10)  # crosses chunks and two epoch boundaries
  assert same(straight, take(make_stream(got, prefetch=0), len(straight)))
  assert not same(straight[:5], take(make_stream(got, seed=4), 5))
  for b in straight:
    assert set(b) == set(packing.KEYS) and all(v.shape == (4, 96) and v.dtype == np.int32 for v in b.values())
  for k in (1, 37, per_epoch - 1, per_epoch, per_epoch + 3, 2 * per_epoch):
    it = make_stream(got)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint's JSON item holds
    assert state['step'] == k
    fresh = make_stream(got, prefetch=k % 3)
    fresh.set_state(state)
    assert same(take(fresh, 10), straight[k : k + 10])
    assert fresh.get_state()['step'] == k + 10
  other = make_stream(got, seed=9)
  with pytest.raises(ValueError, match='seed'):
    other.set_state(state)
  with pytest.raises(ValueError, match='invalid data state'):
    other.set_state({'epoch': 1, 'batch': 0})
  # A state with a step but no stream position keeps the step and restarts the rows.
  step_only = make_stream(got)
  step_only.set_state({'epoch': 1, 'batch': 2, 'step': per_epoch + 2})
  assert step_only.step == per_epoch + 2 and step_only.position == (0, 0, 0)
  assert same(take(step_only, 3), straight[:3])


def test_pipeline_benchmark_times_the_stream(prepared):
  from benchmarks import pipeline_throughput

  _, got = prepared
  s = make_stream(got, chunk_examples=200, prefetch=0)
  rows = [sum(r['inputs'].shape[0] for r in s.epoch_rows(epoch)) for epoch in (0, 1)]
  num_batches = sum(rows) // 4 + 1  # ends a few rows into epoch 2
  seen = []
  stats = pipeline_throughput.iterate(s, num_batches=num_batches, transform=seen.append)
  assert len(seen) == stats['batches'] == num_batches == s.step and stats['epochs'] == 2
  assert stats['batches_per_s'] == pytest.approx(stats['batches'] / stats['seconds'])


def test_state_of_two_processes_resumes_both(prepared):
  _, got = prepared
  streams = [make_stream(got, process_index=p, process_count=2) for p in range(2)]
  for s in streams:
    take(s, 23)
  positions = [list(s.position) for s in streams]
  for s in streams:
    s._gather_states = lambda mine: positions  # (the collective, stubbed)
  state = streams[0].get_state()
  assert state['positions'] == positions and positions[0] != positions[1]
  for p in range(2):
    want = take(streams[p], 5)
    fresh = make_stream(got, process_index=p, process_count=2)
    fresh.set_state(state)
    assert same(take(fresh, 5), want)
  with pytest.raises(ValueError, match='2 processes'):
    make_stream(got).set_state(state)


def _fake_prepared(directory, n, seed=0):
  """Shards of n random examples written as preparation writes them (no text, no tokenizer)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory)
  writer = prepare._ShardWriter(directory, np.dtype(np.uint16), 100_000)
  for lo in range(0, n, 50_000):
    m = min(50_000, n - lo)
    lens = {s: rng.integers(2, 40, m) for s in prepare.SIDES}
    toks = {s: rng.integers(4, 30_000, int(lens[s].sum())).astype(np.int32) for s in prepare.SIDES}
    writer.add(toks, lens)
  writer.flush()
  return {'format': prepare.FORMAT, 'shards': writer.shards, 'num_examples': n}


def test_stream_memory_does_not_grow_with_the_corpus(tmp_path):
  peaks = {}
  for n in (50_000, 500_000):
    manifest = _fake_prepared(str(tmp_path / str(n)), n)
    tracemalloc.start()
    s = stream_lib.TrainStream(
      stream_lib.Shards(str(tmp_path / str(n)), manifest),
      batch_size=16,
      inputs_length=128,
      targets_length=128,
      seed=0,
      chunk_examples=2048,
      prefetch=4,
    )
    for _ in range(400):  # several chunks
      next(s)
    peaks[n] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert all(isinstance(a, np.memmap) for arrays in s.shards.arrays for a in arrays.values())  # not in the heap
    assert s.position[1] >= 2
    s.close()
  print(f'stream peak traced memory: 50k examples {peaks[50_000] / 1e6:.1f} MB, 500k {peaks[500_000] / 1e6:.1f} MB')
  # An O(N) structure (a permutation: 8 bytes/example = 4 MB at 500k) would break this bound.
  assert peaks[500_000] < 1.15 * peaks[50_000] + 1e6


def test_default_task_through_the_stream_keeps_its_packing(tmp_path):
  """The embedded task takes the same path: >= 95% real target slots over a whole epoch, in the rows configs/tiny.py
  packs (its batch and packed lengths, read from the config rather than copied here)."""
  from configs import tiny

  default = tiny.get_config()
  config = make_config(
    '',
    dataset='generated:numbers_en_de',
    max_train_examples=10_000,
    max_length=default.max_length,
    tokenizer_train_sentences=4000,
  )
  config.model.vocab_size = default.model.vocab_size
  got = prepare.ensure_prepared(config, str(tmp_path), progress=False)
  assert got.manifest['num_examples'] == 10_000 and os.path.basename(got.directory).startswith('train-')
  s = stream_lib.TrainStream(
    stream_lib.Shards(got.directory, got.manifest),
    batch_size=default.batch_size,
    inputs_length=default.packed_inputs_length,
    targets_length=default.packed_targets_length,
    seed=0,
    prefetch=0,
  )
  real = slots = 0
  for rows in s.epoch_rows(0):
    real += int(np.count_nonzero(rows['targets_segmentation']))
    slots += rows['targets_segmentation'].size
  assert real == got.manifest['num_tokens']['targets']
  print(f'default task through the stream: {real / slots:.4f} real target slots')
  assert real / slots >= 0.95


@pytest.mark.parametrize(
  'source, target, max_examples, sizes', [('en', 'de', None, [3, 3, 1]), ('de', 'en', 5, [3, 2]), ('en', 'de', 3, [3])]
)
def test_tfds_is_read_in_batches(tmp_path, source, target, max_examples, sizes):
  config = make_config(
    '', dataset='tfds:wmt14_translate/de-en', source_lang=source, target_lang=target, max_train_examples=max_examples
  )
  with helpers.mock_tfds_pairs(7):
    chunks = list(prepare.PairReader(config, 'train', str(tmp_path)).chunks(3))
    # the cap is on the training split only
    evaluation = list(prepare.PairReader(config, 'validation', str(tmp_path)).chunks(3))
  assert [len(s) for s, _ in chunks] == sizes and all(len(s) == len(t) for s, t in chunks)
  assert [x for s, _ in chunks for x in s] == [f'{source} {i}'.encode() for i in range(sum(sizes))]
  assert [x for _, t in chunks for x in t] == [f'{target} {i}'.encode() for i in range(sum(sizes))]
  assert sum(len(s) for s, _ in evaluation) == 7
