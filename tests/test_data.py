"""Tests for transformer_jax.data: packing, tokenizer, sources, training stream."""

import collections
import os
import threading
import time

import ml_collections
import numpy as np
import pytest

from transformer_jax.data import packing
from transformer_jax.data import pipeline
from transformer_jax.data import sources
from transformer_jax.data import tokenizer as tok_lib
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
import helpers

# Packed lengths reported for the default task (see test_packing_efficiency_default_task).
DEFAULT_INPUTS_LENGTH = 160
DEFAULT_TARGETS_LENGTH = 64


def random_examples(rng, n, max_in, max_tg, vocab=50):
  """Examples whose first token is a unique tag (>= 1000) so each one can be recognised."""
  out = []
  for i in range(n):
    li = int(rng.integers(1, max_in))  # content tokens; + tag + EOS <= max_in + 1
    lt = int(rng.integers(0, max_tg))
    src = [1000 + i] + rng.integers(4, vocab, li - 1).tolist() + [EOS_ID] if li > 1 else [1000 + i, EOS_ID]
    tgt = rng.integers(4, vocab, lt).tolist() + [EOS_ID]
    out.append((src, tgt))
  return out


# ---------------------------------------------------------------------------------------------
# Packing.
# ---------------------------------------------------------------------------------------------
def check_packed(examples, packed, inputs_length, targets_length):
  keys = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation', 'inputs_position', 'targets_position')
  assert set(packed) == set(keys)
  rows = packed['inputs'].shape[0]
  for k in keys:
    assert packed[k].dtype == np.int32
    assert packed[k].shape == (rows, inputs_length if k.startswith('inputs') else targets_length)
  rebuilt = []
  for r in range(rows):
    row_tags = []
    for side in ('inputs', 'targets'):
      seg = packed[f'{side}_segmentation'][r]
      pos = packed[f'{side}_position'][r]
      tok = packed[side][r]
      # padding is zero everywhere
      assert np.all(tok[seg == 0] == 0) and np.all(pos[seg == 0] == 0)
      # segments are 1..k, each contiguous, in order, and padding only at the end
      used = seg[seg > 0]
      k = int(used.max(initial=0))
      assert k >= 1, 'empty row'
      assert np.array_equal(np.unique(used), np.arange(1, k + 1))
      assert np.all(np.diff(used) >= 0)
      assert np.all(seg[len(used) :] == 0)
      for s in range(1, k + 1):
        assert np.array_equal(pos[seg == s], np.arange(np.sum(seg == s)))  # restart at 0
    k_in = packed['inputs_segmentation'][r].max()
    k_tg = packed['targets_segmentation'][r].max()
    assert k_in == k_tg  # same segments on both sides
    for s in range(1, k_in + 1):
      src = packed['inputs'][r][packed['inputs_segmentation'][r] == s].tolist()
      tgt = packed['targets'][r][packed['targets_segmentation'][r] == s].tolist()
      rebuilt.append((tuple(src), tuple(tgt)))
      row_tags.append(src[0])
    assert row_tags == sorted(row_tags)  # order-preserving within a row
  # nothing lost, nothing duplicated, every example whole in one segment
  assert collections.Counter(rebuilt) == collections.Counter((tuple(s), tuple(t)) for s, t in examples)
  assert rebuilt == [tuple(map(tuple, e)) for e in packing.unpack_examples(packed)]


@pytest.mark.parametrize(
  'seed,inputs_length,targets_length,window',
  [(0, 16, 8, 64), (1, 32, 32, 1), (2, 24, 6, 4), (3, 8, 8, 2), (4, 64, 20, 64)],
)
def test_pack_examples_properties(seed, inputs_length, targets_length, window):
  rng = np.random.default_rng(seed)
  examples = random_examples(rng, 300, inputs_length, targets_length)
  assert max(len(s) for s, _ in examples) <= inputs_length
  packed = packing.pack_examples(examples, inputs_length, targets_length, max_open_rows=window)
  check_packed(examples, packed, inputs_length, targets_length)
  if window == 1:  # one open row: next-fit, rows hold consecutive examples
    tags = [s[0] for s, _ in packing.unpack_examples(packed)]
    assert tags == sorted(tags)
  again = packing.pack_examples(examples, inputs_length, targets_length, max_open_rows=window)
  for k in packed:
    assert np.array_equal(packed[k], again[k])  # deterministic


def test_pack_examples_first_fit_and_full_rows():
  # Both sides must fit: example 2 fits row 0's inputs but not its targets.
  ex = [([5, 6, 1], [7, 1]), ([8, 1], [9, 9, 9, 1]), ([4, 1], [1])]
  packed = packing.pack_examples(ex, 8, 6)
  assert packed['inputs'].shape[0] == 2
  assert packed['inputs_segmentation'][0].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
  assert packed['targets_segmentation'][0].tolist() == [1, 1, 2, 2, 2, 2]
  assert packed['inputs'][1].tolist() == [4, 1, 0, 0, 0, 0, 0, 0]
  # An exactly full row and empty input
  packed = packing.pack_examples([([1, 1], [2, 1])], 2, 2)
  assert packed['inputs'].tolist() == [[1, 1]] and packed['targets_position'].tolist() == [[0, 1]]
  assert packing.pack_examples([], 4, 4)['inputs'].shape == (0, 4)


def test_pack_examples_rejects_overlong_and_empty():
  with pytest.raises(ValueError, match='cannot be packed'):
    packing.pack_examples([([1] * 9, [1])], 8, 8)
  with pytest.raises(ValueError, match='cannot be packed'):
    packing.pack_examples([([1], [])], 8, 8)


def test_packing_efficiency_counts_target_slots():
  packed = packing.pack_examples([([3, 1], [4, 1]), ([3, 1], [1])], 8, 4)
  assert packing.packing_efficiency(packed) == pytest.approx(3 / 4)


# ---------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------
TINY_CORPUS = ['hello world', 'the cat sat', 'ein kleiner Satz', 'noch einer']


def test_tokenizer_special_ids_unknown_and_tiny_corpus(tmp_path):
  assert len({PAD_ID, EOS_ID, UNK_ID, BOS_ID}) == 4
  assert (PAD_ID, EOS_ID, UNK_ID, BOS_ID) == (0, 1, 2, 3)
  tok = tok_lib.load_or_train_tokenizer(str(tmp_path / 'spm.model'), lambda: TINY_CORPUS, 512)
  sp = tok.processor
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (PAD_ID, EOS_ID, UNK_ID, BOS_ID)
  assert 4 < tok.vocab_size <= 512
  ids = tok.encode('hello Ω')
  assert EOS_ID not in ids and PAD_ID not in ids
  assert UNK_ID in ids  # an unseen character is UNK, not padding
  assert tok.decode(tok.encode('the cat sat')) == 'the cat sat'
  assert tok.encode_batch(['hello', 'cat']) == [tok.encode('hello'), tok.encode('cat')]
  # decode stops at the first EOS and ignores PAD / BOS / ids beyond the vocabulary
  hello = tok.encode('hello')
  assert tok.decode([BOS_ID] + hello + [PAD_ID, EOS_ID] + tok.encode('cat')) == 'hello'
  assert tok.decode(hello + [tok.vocab_size + 5]) == 'hello'
  assert tok.model_path == str(tmp_path / 'spm.model')


def test_tokenizer_cached_not_retrained(tmp_path):
  path = str(tmp_path / 'spm.model')
  tok_lib.load_or_train_tokenizer(path, lambda: TINY_CORPUS, 64)
  mtime = os.stat(path).st_mtime_ns

  def must_not_be_called():
    raise AssertionError('retrained')

  tok = tok_lib.load_or_train_tokenizer(path, must_not_be_called, 64)
  assert os.stat(path).st_mtime_ns == mtime
  assert tok.decode(tok.encode('hello world')) == 'hello world'
  assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]  # atomic write left nothing behind


def test_tokenizer_non_chief_waits_then_times_out(tmp_path):
  path = str(tmp_path / 'spm.model')
  with pytest.raises(RuntimeError, match='timed out'):
    tok_lib.load_or_train_tokenizer(path, lambda: TINY_CORPUS, 64, is_chief=False, timeout_s=0.3, poll_s=0.05)
  assert not os.path.exists(path)  # a non-chief never trains
  writer = threading.Timer(0.3, lambda: tok_lib.load_or_train_tokenizer(path, lambda: TINY_CORPUS, 64))
  writer.start()
  tok = tok_lib.load_or_train_tokenizer(path, lambda: 1 / 0, 64, is_chief=False, timeout_s=30, poll_s=0.05)
  writer.join()
  assert tok.vocab_size > 4


def test_tokenizer_empty_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='no non-empty sentence'):
    tok_lib.load_or_train_tokenizer(str(tmp_path / 'spm.model'), lambda: ['', '  '], 64)


# ---------------------------------------------------------------------------------------------
# Generated default task.
# ---------------------------------------------------------------------------------------------
def test_generated_held_out_disjoint_and_words():
  train = sources.generate_numbers('train', 200_000)
  val = sources.generate_numbers('validation', 1000)
  test = sources.generate_numbers('test', 1000)
  assert len(train) == 200_000 and len(val) == 1000 and len(test) == 1000
  assert not set(train.tolist()) & (set(val.tolist()) | set(test.tolist()))
  assert not set(val.tolist()) & set(test.tolist())
  assert not sources.is_held_out(train).any() and sources.is_held_out(val).all()
  assert len(set(val.tolist())) == 1000
  # numbers drawn evenly from the four ranges
  counts = [np.sum((train >= lo) & (train < hi)) for lo, hi in sources.NUMBER_RANGES]
  assert min(counts) > 0.23 * len(train)
  assert sources.numbers_to_pairs([3421, 21, 1_000_000]) == [
    ('three thousand, four hundred and twenty-one', 'dreitausendvierhunderteinundzwanzig'),
    ('twenty-one', 'einundzwanzig'),
    ('one million', 'eine Million'),
  ]


def test_number_words_from_worker_processes_equal_one_process(monkeypatch):
  numbers = sources.generate_numbers('train', 3000)  # with repeats, in the stream's order
  one_process = sources.numbers_to_pairs(numbers)
  monkeypatch.setattr(sources, '_WORDS_IN_PARALLEL', 1)  # (the default task's train split takes this path)
  monkeypatch.setattr(sources, '_WORDS_CHUNK', 256)
  workers = sources.numbers_to_pairs(numbers)
  assert workers == one_process and len(workers) == 3000
  assert workers[:1] == sources.numbers_to_pairs(numbers[:1]) and len(set(workers)) < 3000


def test_generated_load_shards_cache_and_errors(tmp_path):
  kw = dict(source_lang='en', target_lang='de')
  full = sources.load_text_pairs('generated:numbers_en_de', 'validation', **kw)
  assert len(full) == 1000 and all(isinstance(s, str) and isinstance(t, str) for s, t in full)
  from num2words import num2words

  n = int(sources.generate_numbers('validation', 1)[0])
  assert full[0] == (num2words(n, lang='en'), num2words(n, lang='de'))
  shards = [
    sources.load_text_pairs(
      'generated:numbers_en_de',
      'validation',
      process_index=i,
      process_count=3,
      max_examples=100,
      cache_dir=str(tmp_path),
      **kw,
    )
    for i in range(3)
  ]
  assert [len(s) for s in shards] == [34, 33, 33]
  assert [p for i in range(100) for p in [shards[i % 3][i // 3]]] == full[:100]
  cached = sources.load_text_pairs(
    'generated:numbers_en_de',
    'validation',
    process_index=1,
    process_count=3,
    max_examples=100,
    cache_dir=str(tmp_path),
    **kw,
  )
  assert cached == shards[1] and len(os.listdir(tmp_path)) == 3
  assert len(sources.load_text_pairs('generated:numbers_en_de', 'test[:7]', **kw)) == 7
  with pytest.raises(ValueError, match='supported forms'):
    sources.load_text_pairs('huggingface:wmt', 'train', **kw)
  with pytest.raises(ValueError, match='splits'):
    sources.load_text_pairs('generated:numbers_en_de', 'dev', **kw)


# ---------------------------------------------------------------------------------------------
# Text files and TFDS.
# ---------------------------------------------------------------------------------------------
def write(path, data: bytes):
  with open(path, 'wb') as f:
    f.write(data)


def test_text_source(tmp_path):
  d = str(tmp_path)
  kw = dict(source_lang='en', target_lang='de')
  write(f'{d}/train.en', b'one\ntwo\n\xff\xfe bad\nfour\n')
  write(f'{d}/train.de', b'eins\nzwei\ndrei\nvier\n')
  pairs = sources.load_text_pairs(f'text:{d}', 'train', **kw)
  assert pairs == [('one', 'eins'), ('two', 'zwei'), ('four', 'vier')]  # non-UTF-8 pair skipped
  assert sources.load_text_pairs(f'text:{d}', 'train', process_index=1, process_count=2, **kw) == [
    ('two', 'zwei'),
    ('four', 'vier'),
  ]
  assert sources.load_text_pairs(f'text:{d}', 'train', max_examples=2, **kw) == pairs[:2]
  with pytest.raises(ValueError, match=r'valid\.en does not exist'):
    sources.load_text_pairs(f'text:{d}', 'valid', **kw)
  write(f'{d}/empty.en', b'')
  write(f'{d}/empty.de', b'x\n')
  with pytest.raises(ValueError, match=r'empty\.en is empty'):
    sources.load_text_pairs(f'text:{d}', 'empty', **kw)
  write(f'{d}/uneven.en', b'a\nb\nc\n')
  write(f'{d}/uneven.de', b'a\nb\n')
  with pytest.raises(ValueError, match='has 3 lines but .* has 2'):
    sources.load_text_pairs(f'text:{d}', 'uneven', **kw)


@pytest.mark.parametrize('process_count,max_examples', [(1, None), (3, None), (2, 5)])
def test_text_source_reads_what_tf_data_reads(tmp_path, process_count, max_examples):
  """text:DIR is read without TensorFlow; its pairs are tf.data.TextLineDataset's (zip, take, shard), CRLF, blank
  lines and a last line without a newline included."""
  import tensorflow as tf

  d = str(tmp_path)
  write(f'{d}/t.en', b'one\r\ntwo\n\n  four  \nf\xc3\xbcnf\nsix\nseven')
  write(f'{d}/t.de', b'eins\nzwei\ndrei\n\nfuenf\nsechs\r\nsieben\n')
  for index in range(process_count):
    ds = tf.data.Dataset.zip((tf.data.TextLineDataset(f'{d}/t.en'), tf.data.TextLineDataset(f'{d}/t.de')))
    ds = (ds.take(max_examples) if max_examples is not None else ds).shard(process_count, index)
    expected = [(a.decode().strip(), b.decode().strip()) for a, b in ds.as_numpy_iterator()]
    assert (
      sources.load_text_pairs(
        f'text:{d}',
        't',
        source_lang='en',
        target_lang='de',
        process_index=index,
        process_count=process_count,
        max_examples=max_examples,
      )
      == expected
    )


@pytest.mark.parametrize('max_examples', [None, 0, 5, 20])
@pytest.mark.parametrize('process_count', [1, 3])
@pytest.mark.parametrize('source, target', [('en', 'de'), ('de', 'en')])
def test_tfds_source_gives_the_pairs_in_order_capped_then_sharded(source, target, process_count, max_examples):
  with helpers.mock_tfds_pairs(10):
    for index in range(process_count):
      pairs = sources.load_text_pairs(
        'tfds:wmt14_translate/de-en',
        'train',
        source_lang=source,
        target_lang=target,
        process_index=index,
        process_count=process_count,
        max_examples=max_examples,
      )
      kept = range(10 if max_examples is None else min(max_examples, 10))
      assert pairs == [(f'{source} {i}', f'{target} {i}') for i in kept if i % process_count == index]


def test_tfds_source_names_a_missing_language():
  with helpers.mock_tfds_pairs(3), pytest.raises(ValueError, match="no language 'fr'"):
    sources.load_text_pairs('tfds:wmt14_translate/de-en', 'train', source_lang='en', target_lang='fr')


# ---------------------------------------------------------------------------------------------
# Tokenize, default-task packing efficiency, training stream, eval batches.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def numbers_tokenizer(tmp_path_factory):
  pairs = sources.load_text_pairs(
    'generated:numbers_en_de', 'train', source_lang='en', target_lang='de', max_examples=20_000
  )
  path = str(tmp_path_factory.mktemp('spm') / 'spm.model')
  tok = tok_lib.load_or_train_tokenizer(path, lambda: (x for p in pairs[:10_000] for x in p), 512)
  return tok, pairs


def test_tokenize_pairs(numbers_tokenizer):
  tok, _ = numbers_tokenizer
  pairs = [('one', 'eins'), ('', 'leer'), ('two', ''), ('nine hundred and ninety-nine', 'x')]
  ids = pipeline.tokenize_pairs(tok, pairs, max_length=64)
  assert len(ids) == 2
  assert ids[0] == (tok.encode('one') + [EOS_ID], tok.encode('eins') + [EOS_ID])
  long_len = len(tok.encode(pairs[3][0])) + 1
  assert long_len > 3
  short = pipeline.tokenize_pairs(tok, pairs, max_length=long_len - 1)
  assert pairs[3][0] not in [tok.decode(s) for s, _ in short]  # dropped
  cut = pipeline.tokenize_pairs(tok, pairs, max_length=3, truncate=True)
  assert len(cut) == 2 and all(len(s) <= 3 and s[-1] == EOS_ID for s, _ in cut)
  assert cut[1][0] == tok.encode(pairs[3][0])[:2] + [EOS_ID]


def test_packing_efficiency_default_task(numbers_tokenizer):
  tok, pairs = numbers_tokenizer
  ids = pipeline.tokenize_pairs(tok, pairs, max_length=32)
  assert len(ids) == len(pairs)
  src = np.mean([len(s) for s, _ in ids])
  tgt = np.mean([len(t) for _, t in ids])
  assert 2 < src / tgt < 3.5  # targets much shorter than sources: separate packed lengths
  packed = packing.pack_examples(ids, DEFAULT_INPUTS_LENGTH, DEFAULT_TARGETS_LENGTH)
  eff = packing.packing_efficiency(packed)
  print(
    f'default task: src {src:.2f} tgt {tgt:.2f} tokens/example; target slot efficiency '
    f'{eff:.4f}, input slot efficiency {packing.inputs_efficiency(packed):.4f}'
  )
  assert eff >= 0.95
  assert packing.inputs_efficiency(packed) >= 0.9


def small_ids(n=200, seed=0):
  return [(s, t) for s, t in random_examples(np.random.default_rng(seed), n, 12, 6)]


def test_eval_batches_in_order_and_padded():
  ids = small_ids(50, seed=3)
  batches = pipeline.eval_batches(ids, batch_size=4, inputs_length=24, targets_length=12)
  got = [ex for b in batches for ex in packing.unpack_examples(b)]
  # every example exactly once (first-fit may place a later example in an earlier row)
  assert sorted(tuple(map(tuple, e)) for e in got) == sorted(tuple(map(tuple, e)) for e in ids)
  assert all(v.shape[0] == 4 for b in batches for v in b.values())
  last = batches[-1]['targets_segmentation']
  assert not last[-1].any()  # padded with empty rows (50 examples never fill exactly here)
  more = pipeline.eval_batches(ids, batch_size=4, inputs_length=24, targets_length=12, num_batches=len(batches) + 2)
  assert len(more) == len(batches) + 2 and not any(v.any() for v in more[-1].values())


def tiny_config(**overrides):
  c = ml_collections.ConfigDict()
  c.dataset = 'generated:numbers_en_de'
  c.source_lang, c.target_lang = 'en', 'de'
  c.train_split, c.eval_split = 'train', 'validation'
  c.model = ml_collections.ConfigDict({'vocab_size': 512})
  c.max_length = 32
  c.packed_inputs_length = DEFAULT_INPUTS_LENGTH
  c.packed_targets_length = DEFAULT_TARGETS_LENGTH
  c.batch_size = 8
  c.seed = 0
  c.max_train_examples = 3000
  c.max_eval_examples = 40
  c.tokenizer_train_sentences = 4000
  c.update(overrides)
  return c


def test_build_datasets(tmp_path):
  workdir = str(tmp_path)
  start = time.time()
  ds0 = pipeline.build_datasets(tiny_config(), workdir, process_index=0, process_count=2)
  assert os.path.exists(os.path.join(workdir, 'spm.model'))
  ds = pipeline.build_datasets(tiny_config(), workdir, process_index=1, process_count=2)
  assert ds.tokenizer.encode('seven') == ds0.tokenizer.encode('seven')  # one shared model
  assert not set(map(tuple, ds.eval_pairs)) & set(map(tuple, ds0.eval_pairs))
  assert ds.tokenizer.vocab_size <= 512
  assert len(ds.eval_pairs) == len(ds.eval_ids) == 20
  for (src, tgt), (s_ids, t_ids) in zip(ds.eval_pairs, ds.eval_ids):
    assert ds.tokenizer.decode(t_ids) == tgt and s_ids[-1] == EOS_ID
  batch = next(ds.train)
  assert batch['inputs'].shape == (4, DEFAULT_INPUTS_LENGTH)
  assert batch['targets'].shape == (4, DEFAULT_TARGETS_LENGTH)
  assert ds.train.num_examples == 1500
  assert ds.train.packing_efficiency >= 0.9
  assert time.time() - start < 30
  with pytest.raises(ValueError, match='not divisible'):
    pipeline.build_datasets(tiny_config(), workdir, process_count=3)
