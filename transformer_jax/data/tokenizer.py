"""SentencePiece tokenizer: train once (process 0), write atomically, everyone else loads.

The special ids belong to the vocabulary (`transformer_jax.model.vocab.SpecialIds`): a Tokenizer reads them from its
SentencePiece model (`Tokenizer.special_ids`) and the trainer hands them to the model as configuration. Models this
project trains use the defaults, PAD 0, EOS 1, UNK 2, BOS 3 (the names below are those defaults, kept for callers
that build batches by hand).
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Callable, Iterable, Sequence

from absl import logging
import sentencepiece as spm

from transformer_jax.storage import paths
from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS, SpecialIds
from transformer_jax import errors

PAD_ID = DEFAULT_SPECIAL_IDS.pad
EOS_ID = DEFAULT_SPECIAL_IDS.eos
UNK_ID = DEFAULT_SPECIAL_IDS.unk
BOS_ID = DEFAULT_SPECIAL_IDS.bos


def _exists(path: str) -> bool:
  return paths.exists(path)


def _read_bytes(path: str) -> bytes:
  return paths.read_bytes(path)


def _write_bytes_atomic(path: str, data: bytes) -> None:
  """The whole model or nothing: a local temp file renamed into place; on gs:// one upload (atomic there)."""
  paths.write_bytes_atomic(path, data)


class DamagedTokenizerError(errors.UserError, ValueError):
  """The SentencePiece model file does not parse (truncated, garbage); the message names the file."""


class Tokenizer:
  """A thin wrapper around a SentencePiece processor with the project's special ids."""

  def __init__(self, model_proto: bytes, model_path: str = ''):
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # (sentencepiece raises RuntimeError/OSError on bad protos)
      logging.info('SentencePiece could not parse %s: %s', model_path, e)
      raise DamagedTokenizerError(
        f'the SentencePiece model {model_path or "(in memory)"} is damaged '
        f'({len(model_proto)} bytes that do not parse as a model)'
      ) from None
    self.model_path = model_path
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id(), self._sp.bos_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID, BOS_ID):
      raise ValueError(
        f'SentencePiece model {model_path!r} has (pad, eos, unk, bos) ids {ids}; this project '
        f'needs {(PAD_ID, EOS_ID, UNK_ID, BOS_ID)}. Delete the file to retrain it.'
      )
    self.special_ids = SpecialIds(pad=ids[0], eos=ids[1], unk=ids[2], bos=ids[3])

  @classmethod
  def load(cls, model_path: str) -> Tokenizer:
    return cls(_read_bytes(model_path), model_path)

  @property
  def vocab_size(self) -> int:
    """Number of pieces in the SentencePiece model (may be below the requested size)."""
    return self._sp.get_piece_size()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    return self._sp

  kind = 'sentencepiece'

  def encode(self, text: str, target: bool = False) -> list[int]:
    """Token ids of `text`, without EOS (one shared model: `target` changes nothing; see marian_vocab.py)."""
    del target
    return self._sp.encode(text, out_type=int)

  def encode_batch(self, texts: Sequence[str], target: bool = False) -> list[list[int]]:
    del target
    return self._sp.encode(list(texts), out_type=int)

  def encode_arrays(self, texts: Sequence[str], target: bool = False, num_threads: int = 1) -> list:
    """encode_batch as int32 numpy arrays, on `num_threads` threads."""
    del target
    return self._sp.encode(list(texts), out_type='numpy', num_threads=num_threads)

  def fingerprint(self) -> bytes:
    return self._sp.serialized_model_proto()

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to (not including) the first EOS; PAD, BOS and out-of-vocabulary ids are dropped.

    Out-of-vocabulary ids can occur when the model's embedding table is larger than the
    SentencePiece vocabulary (`hard_vocab_limit=False` may give fewer pieces than asked).
    """
    keep = []
    n = self.vocab_size
    special = self.special_ids
    for i in ids:
      i = int(i)
      if i == special.eos:
        break
      if i in (special.pad, special.bos) or i < 0 or i >= n:
        continue
      keep.append(i)
    return self._sp.decode(keep)

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]


def train_tokenizer_proto(
  sentences: Iterable[str],
  vocab_size: int,
  *,
  max_sentences: int = 1_000_000,
  seed: int = 0,
  options: dict | None = None,
) -> bytes:
  """Trains a unigram SentencePiece model on `sentences` and returns its serialized proto.

  `options` are extra SentencePieceTrainer options that replace the defaults below (the language model's text
  uses byte_fallback, identity normalization and no whitespace folding, so any input round-trips).
  """
  spm.set_random_generator_seed(seed)
  # Empty lines carry nothing to learn and SentencePiece rejects an all-empty corpus.
  it = (s for s in sentences if s and s.strip())
  first = list(itertools.islice(it, 1))
  if not first:
    raise ValueError('cannot train a SentencePiece model: the training text has no non-empty sentence')
  model = io.BytesIO()
  kwargs = dict(
    model_type='unigram',
    vocab_size=vocab_size,
    # A soft limit: a corpus too small for `vocab_size` pieces gives a smaller vocabulary
    # instead of crashing (the model's embedding may then be larger than needed; that is fine).
    hard_vocab_limit=False,
    character_coverage=1.0,
    pad_id=PAD_ID,
    eos_id=EOS_ID,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    pad_piece='<pad>',
    eos_piece='</s>',
    unk_piece='<unk>',
    bos_piece='<s>',
    input_sentence_size=max_sentences,
    shuffle_input_sentence=True,
    num_threads=max(1, min(8, os.cpu_count() or 1)),
    minloglevel=2,
  )
  kwargs.update(options or {})
  spm.SentencePieceTrainer.train(
    sentence_iterator=itertools.islice(itertools.chain(first, it), max_sentences), model_writer=model, **kwargs
  )
  return model.getvalue()


def load_or_train_tokenizer(
  model_path: str,
  sentences: Callable[[], Iterable[str]],
  vocab_size: int,
  *,
  is_chief: bool = True,
  timeout_s: float = 600,
  max_sentences: int = 1_000_000,
  poll_s: float = 1.0,
  train_options: dict | None = None,
) -> Tokenizer:
  """Loads `model_path`, or trains it (chief only) from `sentences()` and writes it atomically.

  Non-chief processes never train: they wait (polling) until the chief's file appears and raise
  RuntimeError after `timeout_s` seconds. `sentences` is only called when training.
  """
  if _exists(model_path):
    logging.info('Loading SentencePiece model %s', model_path)
    try:
      return Tokenizer.load(model_path)
    except DamagedTokenizerError as e:
      raise DamagedTokenizerError(f'{e}; delete it and rerun to retrain the tokenizer') from None
  if is_chief:
    start = time.time()
    proto = train_tokenizer_proto(sentences(), vocab_size, max_sentences=max_sentences, options=train_options)
    _write_bytes_atomic(model_path, proto)
    tok = Tokenizer(proto, model_path)
    logging.info(
      'Trained SentencePiece model %s (%d pieces, asked %d) in %.1f s',
      model_path,
      tok.vocab_size,
      vocab_size,
      time.time() - start,
    )
    return tok
  deadline = time.time() + timeout_s
  while not _exists(model_path):
    if time.time() > deadline:
      raise RuntimeError(
        f'timed out after {timeout_s:.0f} s waiting for the SentencePiece model {model_path!r} '
        "that process 0 should train; check process 0's log"
      )
    time.sleep(poll_s)
  return Tokenizer.load(model_path)
