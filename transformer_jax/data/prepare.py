"""Prepare once, stream always: (dataset, split, tokenizer) -> token-id shards + a JSON manifest.

A preparation pass reads the split's text (plain big-block file reads for `text:DIR`, batched tf.data for
`tfds:NAME`, the cached generated text for `generated:...`), tokenizes it in batches on all cores
(SentencePiece's batch `encode(list, num_threads=...)`), drops what training cannot use (counted, one line per
kind) and writes shards of at most `SHARD_EXAMPLES` examples:

  shard-00000-inputs.npy           flat token ids of every source, EOS included (uint16 if the vocabulary fits)
  shard-00000-inputs_offsets.npy   int64 [n + 1]: example i is inputs[offsets[i]:offsets[i + 1]]
  shard-00000-targets.npy / shard-00000-targets_offsets.npy   the same for the targets
  manifest.json                    format, source description, tokenizer sha256, counts, per-file sha256

in `<root>/<split>-<key>/`, root = config.prepared_data_dir or WORKDIR/data, key = a hash of everything the
shards depend on (format version, source description incl. text files' size/mtime, tokenizer sha256, max_length,
shard size). Plain .npy (np.save, never pickle) so the stream reads them with np.load(mmap_mode='r'): random access
without loading the corpus. Every file is written to a temporary name and renamed; the manifest is written last.
A directory without a manifest, or whose manifest names a missing or damaged file (size or sha256), is deleted and
prepared again, never used. The output is a pure function of the input: the same shards byte for byte.

Bad data (counted, reported, never a crash after minutes of work):
  * mismatched line counts of `text:DIR` files: ValueError before anything is tokenized;
  * a pair with a non-UTF-8 side, an empty side, or a side longer than max_length tokens (EOS included):
    skipped; each kind is counted in the manifest's `skipped` and reported in one warning line.

The SentencePiece model (WORKDIR/spm.model) is trained, when missing, on config.tokenizer_train_sentences
sentences sampled uniformly (fixed seed) from the split in one streaming pass: the corpus is never held in memory.

`transformer-jax prepare --config=... [--workdir=...]` runs this alone (define_flags / run below); `train` runs it
when the shards are missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator

from absl import logging
import numpy as np

from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths
from transformer_jax.data import sources
from transformer_jax.data import tensorflow_cpu
from transformer_jax.data import tokenizer as tokenizer_lib

FORMAT = 'transformer_jax.prepared/1'
MANIFEST = 'manifest.json'
SHARD_EXAMPLES = 1_000_000  # examples per shard (~120 MB of uint16 tokens for WMT-shaped pairs)
READ_PAIRS = 32_768  # pairs read, decoded and tokenized at once
_BLOCK = 1 << 24  # bytes per plain file read
SIDES = ('inputs', 'targets')
SKIP_KINDS = ('not_utf8', 'empty', 'too_long')
_SKIP_WORDS = {
  'not_utf8': 'a side is not UTF-8',
  'empty': 'a side is empty',
  'too_long': 'a side is longer than max_length={max_length} tokens (EOS included)',
}


# ---------------------------------------------------------------------------------------------------------------------
# Reading text in chunks of pairs (raw bytes or str; decoded and checked in _clean)


def _rechunk(blocks: Iterator[list], n: int) -> Iterator[list]:
  buf: list = []
  for lines in blocks:
    buf.extend(lines)
    while len(buf) >= n:
      yield buf[:n]
      del buf[:n]
  if buf:
    yield buf


class PairReader:
  """The global split (all processes' examples) as chunks of (sources, targets) lists, with its size if known."""

  def __init__(self, config, split: str, workdir: str):
    self.dataset = config.dataset
    self.split = split
    self.source_lang, self.target_lang = config.source_lang, config.target_lang
    self.max_examples = config.get('max_train_examples') if split == config.train_split else None
    self.data_dir = config.get('data_dir')
    self.workdir = workdir
    kind, sep, rest = self.dataset.partition(':')
    if not sep or not rest or kind not in ('tfds', 'text', 'generated'):
      raise ValueError(f'unknown dataset {self.dataset!r}; supported forms: ' + '; '.join(sources.SUPPORTED_FORMS))
    self.kind, self.name = kind, rest
    self.total: int | None = None
    self._paths: list[str] = []
    if kind == 'text':
      self._paths = [os.path.join(rest, f'{split}.{lang}') for lang in (self.source_lang, self.target_lang)]
      if paths.is_gcs(rest):  # block reads of a local file (one download per object version, paths.local_copy)
        for path in self._paths:
          if not paths.exists(path):
            raise ValueError(
              f'text dataset: file {path} does not exist (expected parallel files {self._paths[0]} '
              f'and {self._paths[1]}, one sentence per line)'
            )
        self._paths = [paths.local_copy(path) for path in self._paths]
      counts = []
      for path in self._paths:
        if not os.path.exists(path):
          raise ValueError(
            f'text dataset: file {path} does not exist (expected parallel files {self._paths[0]} '
            f'and {self._paths[1]}, one sentence per line)'
          )
        if os.path.getsize(path) == 0:
          raise ValueError(f'text dataset: file {path} is empty')
        counts.append(sources.count_lines(path))
      if counts[0] != counts[1]:  # fail fast: before any tokenizer training or tokenizing
        raise ValueError(
          f'text dataset: {self._paths[0]} has {counts[0]} lines but {self._paths[1]} has '
          f'{counts[1]}; parallel files need one sentence per line on both sides'
        )
      self.total = counts[0]
    elif kind == 'generated':  # the text itself only when read (a process that finds the shards never needs it)
      self._pairs: list[tuple[str, str]] | None = None
      self.total = self._generated_size()
    if self.total is not None and self.max_examples is not None:
      self.total = min(self.total, int(self.max_examples))

  def _generated_size(self) -> int:
    name, limit = sources._parse_split(self.split)
    size = sources.SPLIT_SIZES.get(name, 0)
    return min(c for c in (size, limit, self.max_examples) if c is not None)

  def _generated_pairs(self) -> list[tuple[str, str]]:
    if self._pairs is None:
      self._pairs = sources.load_text_pairs(
        self.dataset,
        self.split,
        source_lang=self.source_lang,
        target_lang=self.target_lang,
        max_examples=self.max_examples,
        cache_dir=self.workdir,
      )
      self.total = len(self._pairs)
    return self._pairs

  def description(self) -> dict:
    """What the shards are made from (part of their directory key)."""
    out = {
      'dataset': self.dataset,
      'split': self.split,
      'source_lang': self.source_lang,
      'target_lang': self.target_lang,
      'max_examples': self.max_examples,
    }
    if self.kind == 'text':
      out['files'] = [
        {'path': os.path.abspath(p), 'bytes': os.path.getsize(p), 'mtime_ns': os.stat(p).st_mtime_ns}
        for p in self._paths
      ]
    if self.kind == 'tfds':
      out['data_dir'] = self.data_dir
    if self.kind == 'generated':
      out['generator_version'] = sources._GENERATOR_VERSION
    return out

  def chunks(self, n: int = READ_PAIRS) -> Iterator[tuple[list, list]]:
    if self.kind == 'generated':
      self._generated_pairs()  # sets the exact total (and raises for a bad task or split)
    left = self.total if self.total is not None else self.max_examples
    if self.kind == 'text':
      gen = zip(_rechunk(sources.file_lines(self._paths[0]), n), _rechunk(sources.file_lines(self._paths[1]), n))
    elif self.kind == 'generated':
      pairs = self._generated_pairs()
      gen = (([s for s, _ in pairs[i : i + n]], [t for _, t in pairs[i : i + n]]) for i in range(0, len(pairs), n))
    else:
      gen = self._tfds_chunks(n)
    for src, tgt in gen:
      if left is not None:
        if left <= 0:
          return
        src, tgt = src[:left], tgt[:left]
        left -= len(src)
      yield src, tgt

  def _tfds_chunks(self, n: int):
    tf, tfds = tensorflow_cpu.tensorflow(), tensorflow_cpu.tensorflow_datasets()
    ds = tfds.load(self.name, split=self.split, data_dir=self.data_dir, shuffle_files=False)
    spec = ds.element_spec
    for lang in (self.source_lang, self.target_lang):
      if lang not in spec:
        raise ValueError(f'tfds:{self.name} has features {sorted(spec)}, no language {lang!r}')
    sl, tl = self.source_lang, self.target_lang
    ds = ds.map(lambda ex: (ex[sl], ex[tl]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if self.max_examples is not None:
      ds = ds.take(self.max_examples)
    # Whole batches to numpy: no per-element Python over tf.data.
    for src, tgt in ds.batch(n).prefetch(2).as_numpy_iterator():
      yield src.tolist(), tgt.tolist()


def _decode(lines: list) -> tuple[list[str], np.ndarray]:
  """Stripped str of every line ('' where not UTF-8) and a mask of the lines that were not UTF-8."""
  bad = np.zeros(len(lines), bool)
  if not lines or isinstance(lines[0], str):
    return [s.strip() for s in lines], bad
  try:
    return [b.decode('utf-8').strip() for b in lines], bad
  except UnicodeDecodeError:
    out = []
    for i, b in enumerate(lines):
      try:
        out.append(b.decode('utf-8').strip())
      except UnicodeDecodeError:
        out.append('')
        bad[i] = True
    return out, bad


def sample_sentences(reader: PairReader, count: int, seed: int = 0) -> list[str]:
  """About `count` sentences (both sides of count/2 pairs) drawn uniformly without replacement, in one pass."""
  pairs = max(1, count // 2)
  total = reader.total
  if total is None:  # tfds without a known size: count with a batched pass first
    total = sum(len(s) for s, _ in reader.chunks())
  picks = np.sort(np.random.default_rng(seed).choice(total, min(pairs, total), replace=False))
  out: list[str] = []
  base = 0
  for src, tgt in reader.chunks():
    lo, hi = np.searchsorted(picks, [base, base + len(src)])
    idx = (picks[lo:hi] - base).tolist()
    base += len(src)
    if idx:
      for side in (src, tgt):
        texts, _ = _decode([side[i] for i in idx])
        out.extend(t for t in texts if t)
    if hi == len(picks):
      break
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Files: atomic writes, hashes, the manifest


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while True:
      block = f.read(_BLOCK)
      if not block:
        return h.hexdigest()
      h.update(block)


def _save_npy(directory: str, name: str, array: np.ndarray) -> dict:
  path = os.path.join(directory, name)
  paths.write_local_atomic(path, lambda f: np.save(f, array, allow_pickle=False))
  return {'name': name, 'bytes': os.path.getsize(path), 'sha256': _sha256(path)}


def tokenizer_sha256(tokenizer: tokenizer_lib.Tokenizer) -> str:
  return hashlib.sha256(tokenizer.fingerprint()).hexdigest()


def shard_directory(root: str, split: str, key_fields: dict) -> str:
  key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
  safe = ''.join(c if c.isalnum() or c in '-_' else '_' for c in split)
  return os.path.join(root, f'{safe}-{key}')


def read_manifest(directory: str, *, verify: bool = True) -> dict | None:
  """The manifest if the directory holds a complete preparation (every file present, size and sha256 as recorded)."""
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path, 'rb') as f:
      manifest = json.loads(f.read().decode('utf-8'))
  except (OSError, ValueError):
    return None
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    return None
  try:
    for shard in manifest['shards']:
      for entry in shard['files'].values():
        file = os.path.join(directory, entry['name'])
        if not os.path.exists(file) or os.path.getsize(file) != entry['bytes']:
          logging.warning('Prepared data %s: %s is missing or has the wrong size; preparing again', directory, file)
          return None
        if verify and _sha256(file) != entry['sha256']:
          logging.warning('Prepared data %s: %s is damaged (sha256); preparing again', directory, file)
          return None
  except (KeyError, TypeError):
    return None
  return manifest


# ---------------------------------------------------------------------------------------------------------------------
# Preparation


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def _tokenize(tokenizer: tokenizer_lib.Tokenizer, texts: list[str], num_threads: int, target: bool = False):
  """(flat ids with EOS after each text, lengths incl. EOS); texts are non-empty. `target`: target-side text (a
  Marian vocabulary has its own SentencePiece model per side)."""
  arrays = tokenizer.encode_arrays(texts, target=target, num_threads=num_threads)
  lens = np.fromiter((a.size for a in arrays), np.int64, count=len(arrays))
  flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
  out = np.full(flat.size + len(arrays), tokenizer.special_ids.eos, np.int32)
  out[np.arange(flat.size) + np.repeat(np.arange(len(arrays)), lens)] = flat  # leave a slot for each EOS
  return out, lens + 1


class _ShardWriter:
  def __init__(self, directory: str, dtype: np.dtype, shard_examples: int):
    self.directory, self.dtype, self.shard_examples = directory, dtype, shard_examples
    self.parts: dict[str, list[np.ndarray]] = {s: [] for s in SIDES}
    self.lens: dict[str, list[np.ndarray]] = {s: [] for s in SIDES}
    self.pending = 0
    self.shards: list[dict] = []

  def add(self, tokens: dict[str, np.ndarray], lens: dict[str, np.ndarray]) -> None:
    n = len(lens['inputs'])
    start = 0
    while start < n:
      take = min(n - start, self.shard_examples - self.pending)
      for s in SIDES:
        cum = np.concatenate([[0], np.cumsum(lens[s])])
        self.parts[s].append(tokens[s][cum[start] : cum[start + take]].astype(self.dtype))
        self.lens[s].append(lens[s][start : start + take])
      self.pending += take
      start += take
      if self.pending == self.shard_examples:
        self.flush()

  def flush(self) -> None:
    if not self.pending:
      return
    index = len(self.shards)
    files = {}
    for s in SIDES:
      lens = np.concatenate(self.lens[s])
      offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
      files[s] = _save_npy(self.directory, f'shard-{index:05d}-{s}.npy', np.concatenate(self.parts[s]))
      files[f'{s}_offsets'] = _save_npy(self.directory, f'shard-{index:05d}-{s}_offsets.npy', offsets)
      self.parts[s], self.lens[s] = [], []
    self.shards.append({'index': index, 'num_examples': int(self.pending), 'files': files})
    self.pending = 0


def _progress_bar(reader: PairReader, progress: bool):
  """The preparation's progress in pairs read, on stderr."""
  from tqdm import tqdm

  return tqdm(
    total=reader.total,
    disable=not progress,
    unit=' pairs',
    unit_scale=True,
    dynamic_ncols=True,
    desc=f'prepare {reader.dataset} {reader.split}',
    file=sys.stderr,
  )


def _tokenize_chunk(
  tokenizer: tokenizer_lib.Tokenizer, src_raw: list, tgt_raw: list, threads: int, max_length: int, skipped: dict
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(flat ids, lengths) per side of the chunk's usable pairs; each unusable pair is counted in `skipped`."""
  src, bad_s = _decode(src_raw)
  tgt, bad_t = _decode(tgt_raw)
  bad = bad_s | bad_t
  empty = ~bad & np.array([not s or not t for s, t in zip(src, tgt)], bool)
  keep = np.flatnonzero(~bad & ~empty)
  skipped['not_utf8'] += int(bad.sum())
  skipped['empty'] += int(empty.sum())
  toks, lens = {}, {}
  for side, texts in (('inputs', src), ('targets', tgt)):
    toks[side], lens[side] = _tokenize(tokenizer, [texts[i] for i in keep.tolist()], threads, target=side == 'targets')
  fits = (lens['inputs'] <= max_length) & (lens['targets'] <= max_length)
  skipped['too_long'] += int((~fits).sum())
  if not fits.all():
    for side in SIDES:
      mask = np.repeat(fits, lens[side])
      toks[side], lens[side] = toks[side][mask], lens[side][fits]
  return toks, lens


def _write_manifest(
  directory: str,
  reader: PairReader,
  tokenizer: tokenizer_lib.Tokenizer,
  writer: _ShardWriter,
  *,
  max_length: int,
  read: int,
  tokens_total: dict,
  skipped: dict,
) -> dict:
  """Reports the skipped pairs and writes the manifest (last: the preparation is then complete); returns it."""
  num_examples = sum(s['num_examples'] for s in writer.shards)
  manifest = {
    'format': FORMAT,
    'source': reader.description(),
    'tokenizer_sha256': tokenizer_sha256(tokenizer),
    'vocab_size': int(tokenizer.vocab_size),
    'max_length': int(max_length),
    'dtype': writer.dtype.name,
    'pairs_read': int(read),
    'num_examples': int(num_examples),
    'num_tokens': tokens_total,
    'skipped': skipped,
    'shards': writer.shards,
  }
  report_skipped(manifest, f'{reader.dataset} [{reader.split}]')
  if not num_examples:
    raise ValueError(
      f'{reader.dataset} split {reader.split!r}: no usable examples among {read} pairs (skipped: {skipped})'
    )
  data = json.dumps(manifest, indent=1, sort_keys=True).encode('utf-8')
  # last: the preparation is complete
  paths.write_local_atomic(os.path.join(directory, MANIFEST), lambda f: f.write(data))
  return manifest


def prepare_split(
  reader: PairReader,
  tokenizer: tokenizer_lib.Tokenizer,
  directory: str,
  *,
  max_length: int,
  shard_examples: int = SHARD_EXAMPLES,
  progress: bool = True,
  num_threads: int | None = None,
) -> dict:
  """Writes the shards and the manifest (last) into `directory` (emptied first); returns the manifest."""
  if max_length < 2:
    raise ValueError(f'max_length must be >= 2 (one token + EOS), got {max_length}')
  start = time.time()
  if os.path.isdir(directory):
    shutil.rmtree(directory)  # a half-written earlier attempt: never reused
  os.makedirs(directory)
  threads = num_threads or max(1, os.cpu_count() or 1)
  writer = _ShardWriter(directory, _token_dtype(tokenizer.vocab_size), shard_examples)
  skipped = dict.fromkeys(SKIP_KINDS, 0)
  read = 0
  tokens_total = dict.fromkeys(SIDES, 0)
  with _progress_bar(reader, progress) as bar:
    for src_raw, tgt_raw in reader.chunks():
      n = len(src_raw)
      read += n
      toks, lens = _tokenize_chunk(tokenizer, src_raw, tgt_raw, threads, max_length, skipped)
      for side in SIDES:
        tokens_total[side] += int(lens[side].sum())
      writer.add(toks, lens)
      bar.update(n)
  writer.flush()
  manifest = _write_manifest(
    directory, reader, tokenizer, writer, max_length=max_length, read=read, tokens_total=tokens_total, skipped=skipped
  )
  logging.info(
    'Prepared %d examples of %s in %s (%d shards, %.1f s)',
    manifest['num_examples'],
    reader.dataset,
    directory,
    len(writer.shards),
    time.time() - start,
  )
  return manifest


def report_skipped(manifest: dict, what: str) -> list[str]:
  """One warning line per kind of skipped pair (only kinds that occurred); returns the lines."""
  lines = []
  for kind in SKIP_KINDS:
    n = manifest['skipped'].get(kind, 0)
    if n:
      reason = _SKIP_WORDS[kind].format(max_length=manifest['max_length'])
      lines.append(f'{what}: skipped {n} of {manifest["pairs_read"]} pairs: {reason}')
  for line in lines:
    logging.warning('%s', line)
  return lines


# ---------------------------------------------------------------------------------------------------------------------
# The whole step the trainer and the CLI call


class Prepared:
  """A complete preparation: its directory and manifest, plus the tokenizer it was made with."""

  def __init__(self, directory: str, manifest: dict, tokenizer: tokenizer_lib.Tokenizer, reused: bool):
    self.directory, self.manifest, self.tokenizer, self.reused = directory, manifest, tokenizer, reused


def ensure_prepared(
  config,
  workdir: str | layout_lib.WorkdirLayout,
  *,
  split: str | None = None,
  is_chief: bool = True,
  progress: bool = True,
  timeout_s: float | None = None,
  poll_s: float = 1.0,
) -> Prepared:
  """The tokenizer (trained on a sample when missing) and the split's shards (prepared when missing or damaged).

  Only the chief trains and prepares; other processes wait for the tokenizer and then for a complete manifest.
  """
  split = split or config.train_split
  workdir = layout_lib.of(workdir)
  reader = PairReader(config, split, workdir.generated_data)
  max_sentences = int(config.get('tokenizer_train_sentences', 200_000))
  from transformer_jax.data import marian_vocab

  marian_dir = workdir.marian_dir
  if config.get('vocabulary', 'sentencepiece') == 'marian' or marian_vocab.is_marian_dir(marian_dir):
    tokenizer = marian_vocab.MarianVocab.load(marian_dir)  # an imported model's own vocabulary: never trained
  else:
    tokenizer = tokenizer_lib.load_or_train_tokenizer(
      workdir.tokenizer,
      lambda: sample_sentences(reader, max_sentences),
      int(config.model.vocab_size),
      is_chief=is_chief,
      max_sentences=max_sentences,
    )
  if tokenizer.vocab_size > config.model.vocab_size:  # before any shard is written
    raise ValueError(
      f'tokenizer has {tokenizer.vocab_size} pieces but model.vocab_size is '
      f'{config.model.vocab_size}; delete {tokenizer.model_path} or raise vocab_size'
    )
  root = config.get('prepared_data_dir') or workdir.prepared
  if paths.is_gcs(root):
    raise ValueError(
      f'prepared_data_dir={root}: the token-id shards are memory-mapped, so they must be on a local '
      'disk; leave it unset (a gs:// workdir prepares into a local cache) or give a local directory'
    )
  max_length = int(config.max_length)
  key = {
    'format': FORMAT,
    'source': reader.description(),
    'tokenizer_sha256': tokenizer_sha256(tokenizer),
    'max_length': max_length,
    'shard_examples': SHARD_EXAMPLES,
  }
  directory = shard_directory(root, split, key)
  manifest = read_manifest(directory)
  if manifest is not None:
    logging.info('Using prepared data %s (%d examples)', directory, manifest['num_examples'])
    return Prepared(directory, manifest, tokenizer, reused=True)
  if is_chief:
    manifest = prepare_split(
      reader, tokenizer, directory, max_length=max_length, progress=progress, shard_examples=SHARD_EXAMPLES
    )
    return Prepared(directory, manifest, tokenizer, reused=False)
  timeout_s = float(config.get('prepare_timeout_s', 7200)) if timeout_s is None else timeout_s
  deadline = time.time() + timeout_s
  while True:
    manifest = read_manifest(directory, verify=False)
    if manifest is not None:
      manifest = read_manifest(directory)  # complete: now check every byte once
      if manifest is not None:
        return Prepared(directory, manifest, tokenizer, reused=True)
    if time.time() > deadline:
      raise RuntimeError(f'timed out after {timeout_s:.0f} s waiting for process 0 to prepare {directory}')
    time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------------------------------
# `transformer-jax prepare`


def run(config, workdir: str | layout_lib.WorkdirLayout, split: str | None = None) -> None:
  """The command's body; commands.py passes the workdir (the same default as train's)."""
  workdir = layout_lib.of(workdir)
  paths.makedirs(workdir.root)
  start = time.time()
  prepared = ensure_prepared(config, workdir, split=split)
  m = prepared.manifest
  if prepared.reused:
    report_skipped(m, f'{m["source"]["dataset"]} [{m["source"]["split"]}]')
  print(
    f'prepared: examples={m["num_examples"]} pairs_read={m["pairs_read"]} '
    + ' '.join(f'skipped_{k}={m["skipped"][k]}' for k in SKIP_KINDS)
    + f' shards={len(m["shards"])} dir={prepared.directory} reused={int(prepared.reused)} '
    f'seconds={time.time() - start:.1f}',
    flush=True,
  )
