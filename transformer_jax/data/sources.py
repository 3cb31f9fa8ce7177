"""Where (source, target) text pairs come from: TFDS, parallel text files, or a generated task.

Every loader returns this process's shard only, sharded before the text is materialised.
TensorFlow is imported lazily so that importing this package stays cheap.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import time
from collections.abc import Iterator

from absl import logging
import numpy as np

from transformer_jax.data import tensorflow_cpu

SUPPORTED_FORMS = (
  'tfds:NAME (e.g. tfds:wmt14_translate/de-en)',
  'text:DIR (parallel files DIR/{split}.{source_lang} and DIR/{split}.{target_lang})',
  'generated:numbers_en_de',
)

# ---------------------------------------------------------------------------------------------
# The generated default task: English number words -> German number words.
# ---------------------------------------------------------------------------------------------
GENERATED_TASKS = ('numbers_en_de',)
NUMBER_RANGES = ((1, 100), (100, 10_000), (10_000, 1_000_000), (1_000_000, 10_000_000))
SPLIT_SIZES = {'train': 200_000, 'validation': 1000, 'test': 1000}
_SPLIT_SEEDS = {'train': 20171206, 'validation': 1, 'test': 2}
_HELD_OUT_BUCKETS = {'validation': (0, 1), 'test': (2, 3)}  # 4% of all numbers are held out
_NUM_BUCKETS = 100
_CHUNK = 65_536  # numbers are drawn in fixed chunks so a prefix never depends on the size asked
_GENERATOR_VERSION = 1  # bump when the generated text changes, to invalidate caches


def number_bucket(n):
  """Deterministic bucket in [0, 100) of a number (Knuth's multiplicative hash, top bits)."""
  n = np.asarray(n, np.uint64)
  h = (n * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
  return ((h * np.uint64(_NUM_BUCKETS)) >> np.uint64(32)).astype(np.int64)


def is_held_out(n):
  """True for numbers reserved for validation/test; they never appear in 'train'."""
  return number_bucket(n) < 4


def _split_accepts(split: str, numbers: np.ndarray) -> np.ndarray:
  b = number_bucket(numbers)
  if split == 'train':
    return b >= 4
  return np.isin(b, _HELD_OUT_BUCKETS[split])


def _parse_split(split: str) -> tuple[str, int | None]:
  m = re.fullmatch(r'\s*(\w+)\s*(?:\[\s*:\s*(\d+)\s*\])?\s*', split)
  if not m:
    raise ValueError(f'bad split {split!r}: use NAME or NAME[:N]')
  return m.group(1), (int(m.group(2)) if m.group(2) else None)


def generate_numbers(split: str, size: int) -> np.ndarray:
  """The first `size` numbers of a split (a fixed-seed stream, identical on every process).

  A range is picked uniformly, then a number uniformly inside it; numbers whose hash bucket
  belongs to another split are rejected. 'train' keeps duplicates; 'validation'/'test' are
  unique numbers (exact match over repeated items would be misleading).
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f'generated:numbers_en_de has splits {sorted(SPLIT_SIZES)}, got {split!r}')
  rng = np.random.default_rng(_SPLIT_SEEDS[split])
  lows = np.array([lo for lo, _ in NUMBER_RANGES], np.int64)
  highs = np.array([hi for _, hi in NUMBER_RANGES], np.int64)
  unique = split != 'train'
  seen: set[int] = set()
  out: list[np.ndarray] = []
  have = 0
  while have < size:
    which = rng.integers(0, len(NUMBER_RANGES), _CHUNK)
    nums = rng.integers(lows[which], highs[which])
    nums = nums[_split_accepts(split, nums)]
    if unique:
      keep = []
      for x in nums.tolist():
        if x not in seen:
          seen.add(x)
          keep.append(x)
      nums = np.asarray(keep, np.int64)
    out.append(nums)
    have += len(nums)
  return np.concatenate(out)[:size] if out else np.zeros(0, np.int64)


def _number_words(numbers: list[int]) -> list[tuple[str, str]]:
  from num2words import CONVERTER_CLASSES

  en = CONVERTER_CLASSES['en'].to_cardinal  # what num2words(n, lang=...) calls, without the lookup
  de = CONVERTER_CLASSES['de'].to_cardinal
  return [(en(n), de(n)) for n in numbers]


_WORDS_CHUNK = 4096  # numbers per task (and per progress-bar update)
_WORDS_IN_PARALLEL = 20_000  # distinct numbers from which worker processes repay their start-up


def numbers_to_pairs(numbers, desc: str | None = None) -> list[tuple[str, str]]:
  """num2words(n, lang='en') -> num2words(n, lang='de'), computed once per distinct number; with desc, a progress
  bar. num2words is slow (the default task's distinct train numbers take the longest part of data preparation), so
  large sets are split over worker processes, one per core (spawned: the parent may already run XLA's threads)."""
  from tqdm import tqdm

  numbers = np.asarray(numbers, np.int64)
  distinct_array = np.unique(numbers)
  distinct = distinct_array.tolist()
  chunks = [distinct[i : i + _WORDS_CHUNK] for i in range(0, len(distinct), _WORDS_CHUNK)]
  bar = tqdm(total=len(distinct), disable=desc is None, desc=desc, unit=' numbers', unit_scale=True, dynamic_ncols=True)
  words: list[tuple[str, str]] = []
  workers = min(os.cpu_count() or 1, len(chunks))
  if len(distinct) >= _WORDS_IN_PARALLEL and workers > 1:
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn')) as pool:
      for part in pool.map(_number_words, chunks):  # in order
        words.extend(part)
        bar.update(len(part))
  else:
    for chunk in chunks:
      words.extend(_number_words(chunk))
      bar.update(len(chunk))
  bar.close()
  index = np.searchsorted(distinct_array, numbers)
  return [words[i] for i in index.tolist()]


def _load_generated(
  task: str,
  split: str,
  *,
  source_lang: str,
  target_lang: str,
  process_index: int,
  process_count: int,
  max_examples: int | None,
  cache_dir: str | None,
) -> list[tuple[str, str]]:
  if task not in GENERATED_TASKS:
    raise ValueError(f'unknown generated task {task!r}; known: {", ".join(GENERATED_TASKS)}')
  if (source_lang, target_lang) != ('en', 'de'):
    raise ValueError(f'generated:numbers_en_de translates en -> de, got {source_lang} -> {target_lang}')
  name, limit = _parse_split(split)
  if name not in SPLIT_SIZES:
    raise ValueError(f'generated:numbers_en_de has splits {sorted(SPLIT_SIZES)}, got {split!r}')
  size = SPLIT_SIZES[name]
  for cap in (limit, max_examples):
    if cap is not None:
      size = min(size, cap)
  cache = None
  if cache_dir:
    cache = os.path.join(cache_dir, f'{task}-v{_GENERATOR_VERSION}-{name}-{size}-{process_index}of{process_count}.tsv')
    pairs = _read_tsv_cache(cache)
    if pairs is not None:
      return pairs
  start = time.time()
  numbers = generate_numbers(name, size)[process_index::process_count]  # shard, then make text
  pairs = numbers_to_pairs(numbers, desc=f'words for {task} {name}' if process_index == 0 else None)
  logging.info('Generated %d %s pairs of %s in %.1f s', len(pairs), name, task, time.time() - start)
  if cache:
    _write_tsv_cache(cache, pairs)
  return pairs


def _read_tsv_cache(path: str) -> list[tuple[str, str]] | None:
  from transformer_jax.storage import paths

  if not paths.exists(path):
    return None
  data = paths.read_text(path)  # garbage fails the sha1 check below, not here
  header, _, body = data.partition('\n')
  lines = body.split('\n')[:-1] if body else []
  m = re.fullmatch(r'# pairs=(\d+) sha1=([0-9a-f]+)', header)
  if not m or int(m.group(1)) != len(lines) or hashlib.sha1(body.encode()).hexdigest() != m.group(2):
    logging.warning('Ignoring a damaged cache file %s', path)
    return None
  return [tuple(line.split('\t', 1)) for line in lines]  # type: ignore[misc]


def _write_tsv_cache(path: str, pairs: list[tuple[str, str]]) -> None:
  from transformer_jax.storage import paths

  body = ''.join(f'{s}\t{t}\n' for s, t in pairs)
  data = f'# pairs={len(pairs)} sha1={hashlib.sha1(body.encode()).hexdigest()}\n{body}'
  try:
    paths.write_text_atomic(path, data)  # gs:// too (TensorFlow's gs:// filesystem cannot be pointed elsewhere)
  except Exception as e:
    logging.warning('Could not write the cache file %s: %s', path, e)


# ---------------------------------------------------------------------------------------------
# TFDS and text files.
# ---------------------------------------------------------------------------------------------
def _decode_pairs(rows, what: str) -> list[tuple[str, str]]:
  pairs = []
  bad = 0
  for src, tgt in rows:
    try:
      pairs.append((src.decode('utf-8').strip(), tgt.decode('utf-8').strip()))
    except UnicodeDecodeError:
      bad += 1
  if bad:
    logging.warning('Skipped %d pair(s) with non-UTF-8 text in %s', bad, what)
  return pairs


def _load_tfds(
  name: str,
  split: str,
  *,
  source_lang: str,
  target_lang: str,
  process_index: int,
  process_count: int,
  data_dir: str | None,
  max_examples: int | None,
) -> list[tuple[str, str]]:
  tf, tfds = tensorflow_cpu.tensorflow(), tensorflow_cpu.tensorflow_datasets()
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  spec = ds.element_spec
  for lang in (source_lang, target_lang):
    if lang not in spec:
      raise ValueError(f'tfds:{name} has features {sorted(spec)}, no language {lang!r}')
  ds = ds.map(lambda ex: (ex[source_lang], ex[target_lang]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if max_examples is not None:
    ds = ds.take(max_examples)
  ds = ds.shard(process_count, process_index)
  return _decode_pairs(ds.as_numpy_iterator(), f'tfds:{name}[{split}]')


_BLOCK = 1 << 24  # bytes per read of a text file


def count_lines(path: str) -> int:
  """Lines in the file, a last line without a newline included (as tf.data.TextLineDataset counts them)."""
  count, last = 0, b'\n'
  with open(path, 'rb') as f:
    while True:
      block = f.read(_BLOCK)
      if not block:
        break
      count += block.count(b'\n')
      last = block[-1:]
  return count + (last != b'\n')


def file_lines(path: str) -> Iterator[list[bytes]]:
  """The file's lines as bytes without the newline, in lists of one big block read each."""
  rest = b''
  with open(path, 'rb') as f:
    while True:
      block = f.read(_BLOCK)
      if not block:
        break
      lines = (rest + block).split(b'\n')
      rest = lines.pop()
      yield lines
  if rest:
    yield [rest]


def _load_text(
  directory: str,
  split: str,
  *,
  source_lang: str,
  target_lang: str,
  process_index: int,
  process_count: int,
  max_examples: int | None,
) -> list[tuple[str, str]]:
  paths = [os.path.join(directory, f'{split}.{lang}') for lang in (source_lang, target_lang)]
  counts = []
  for path in paths:
    if not os.path.isfile(path):
      raise ValueError(
        f'text dataset: file {path} does not exist (expected parallel files '
        f'{paths[0]} and {paths[1]}, one sentence per line)'
      )
    if os.path.getsize(path) == 0:
      raise ValueError(f'text dataset: file {path} is empty')
    counts.append(count_lines(path))
  if counts[0] != counts[1]:
    raise ValueError(
      f'text dataset: {paths[0]} has {counts[0]} lines but {paths[1]} has '
      f'{counts[1]}; parallel files need one sentence per line on both sides'
    )
  lines = [itertools.chain.from_iterable(file_lines(p)) for p in paths]
  pairs = itertools.islice(zip(*lines), max_examples)
  mine = (pair for i, pair in enumerate(pairs) if i % process_count == process_index)
  return _decode_pairs(mine, f'{paths[0]} / {paths[1]}')


def load_text_pairs(
  dataset: str,
  split: str,
  *,
  source_lang: str,
  target_lang: str,
  process_index: int = 0,
  process_count: int = 1,
  data_dir: str | None = None,
  max_examples: int | None = None,
  cache_dir: str | None = None,
) -> list[tuple[str, str]]:
  """(source, target) strings of `split` for this process (every process_count-th example).

  `max_examples` caps the split before sharding (a global count). `cache_dir` (generated tasks
  only) keeps the generated text as a plain TSV file so later runs skip generation.
  Errors in the dataset spec or the files are raised as one ValueError with a readable message.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if max_examples is not None and max_examples < 0:
    raise ValueError(f'max_examples must be >= 0, got {max_examples}')
  kind, sep, rest = dataset.partition(':')
  if not sep or not rest:
    kind = ''
  kw = dict(
    source_lang=source_lang,
    target_lang=target_lang,
    process_index=process_index,
    process_count=process_count,
    max_examples=max_examples,
  )
  if kind == 'tfds':
    return _load_tfds(rest, split, data_dir=data_dir, **kw)
  if kind == 'text':
    return _load_text(rest, split, **kw)
  if kind == 'generated':
    return _load_generated(rest, split, cache_dir=cache_dir, **kw)
  raise ValueError(f'unknown dataset {dataset!r}; supported forms: ' + '; '.join(SUPPORTED_FORMS))
