"""A released Marian (OPUS-MT) vocabulary: source and target SentencePiece models and one vocab.json id map.

What `transformers.MarianTokenizer` (separate_vocabs=False) does, without transformers: a source sentence is cut into
pieces by source.spm, a target sentence by target.spm; every piece is looked up in vocab.json (a piece it does not
hold, e.g. an unknown character, is <unk>); a leading language code `>>xx<<` stays one token. Decoding maps ids back
through vocab.json and joins the pieces with target.spm, dropping the special tokens (MarianTokenizer.decode with
skip_special_tokens=True). The ids are the checkpoint's: EOS 0, UNK 1, PAD = the last id and the decoder start = PAD
for OPUS-MT (read from special_ids.json, written at import from the checkpoint's config.json).

An imported workdir keeps these files in WORKDIR/marian/ (source.spm, target.spm, vocab.json, special_ids.json);
no SentencePiece model is trained for it. The project's own single shared SentencePiece model (tokenizer.py) stays
the vocabulary of every run trained from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from transformer_jax.model.vocab import SpecialIds
from transformer_jax.storage import layout as layout_lib

DIRECTORY = layout_lib.MARIAN_DIR_NAME  # inside a workdir
FILES = ('source.spm', 'target.spm', 'vocab.json', 'special_ids.json')


def is_marian_dir(path: str) -> bool:
  return all(os.path.exists(os.path.join(path, name)) for name in FILES)


class MarianVocab:
  """Tokenizer interface of tokenizer.Tokenizer (encode / encode_batch / decode / special_ids / vocab_size), with
  `target=True` choosing target.spm for target-side text."""

  kind = 'marian'

  def __init__(self, directory: str):
    self.model_path = directory
    read = lambda name: open(os.path.join(directory, name), 'rb').read()
    self._source_bytes, self._target_bytes = read('source.spm'), read('target.spm')
    self._source = spm.SentencePieceProcessor(model_proto=self._source_bytes)
    self._target = spm.SentencePieceProcessor(model_proto=self._target_bytes)
    self._vocab_bytes = read('vocab.json')
    self.encoder: dict[str, int] = json.loads(self._vocab_bytes.decode('utf-8'))
    self.decoder = {i: piece for piece, i in self.encoder.items()}
    self._special_bytes = read('special_ids.json')
    self.special_ids = SpecialIds.from_dict(json.loads(self._special_bytes.decode('utf-8')))
    self._size = max(self.encoder.values()) + 1
    # What skip_special_tokens drops: eos, unk, pad (MarianTokenizer's special tokens) and the decoder start.
    self._special = {self.special_ids.eos, self.special_ids.unk, self.special_ids.pad, self.special_ids.bos}

  @classmethod
  def load(cls, directory: str) -> MarianVocab:
    return cls(directory)

  @property
  def vocab_size(self) -> int:
    return self._size

  def fingerprint(self) -> bytes:
    """Bytes that change with anything encoding depends on (prepared shards are keyed by their sha256)."""
    return hashlib.sha256(self._source_bytes + self._target_bytes + self._vocab_bytes + self._special_bytes).digest()

  def _ids(self, pieces: list[str]) -> list[int]:
    unk = self.special_ids.unk
    return [self.encoder.get(p, unk) for p in pieces]

  def encode(self, text: str, target: bool = False) -> list[int]:
    """Ids of `text` without EOS, as MarianTokenizer gives them (its EOS appended is the caller's)."""
    code = []
    if text.startswith('>>') and (end := text.find('<<')) != -1:  # a language code token
      code, text = [text[: end + 2]], text[end + 2 :]
    processor = self._target if target else self._source
    return self._ids(code + processor.encode(text, out_type=str))

  def encode_batch(self, texts: Sequence[str], target: bool = False) -> list[list[int]]:
    return [self.encode(t, target) for t in texts]

  def encode_arrays(self, texts: Sequence[str], target: bool = False, num_threads: int = 1) -> list[np.ndarray]:
    del num_threads
    return [np.asarray(ids, np.int32) for ids in self.encode_batch(texts, target)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS, special tokens dropped (MarianTokenizer.decode(skip_special_tokens=True))."""
    pieces = []
    for i in ids:
      i = int(i)
      if i == self.special_ids.eos:
        break
      if i in self._special:
        continue
      piece = self.decoder.get(i)
      if piece is None:  # an id vocab.json lacks: MarianTokenizer falls back to the SentencePiece piece
        piece = self._target.id_to_piece(i) if 0 <= i < self._target.get_piece_size() else ''
      if piece:
        pieces.append(piece)
    return self._target.decode_pieces(pieces).replace('\u2581', ' ').strip()

  def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
    return [self.decode(ids) for ids in batch]

  def id_to_piece(self, i: int) -> str:
    return self.decoder.get(int(i), '')


def write_marian_dir(
  directory: str, source_spm: bytes, target_spm: bytes, vocab: dict[str, int], special_ids: SpecialIds
) -> None:
  os.makedirs(directory, exist_ok=True)
  for name, data in (
    ('source.spm', source_spm),
    ('target.spm', target_spm),
    ('vocab.json', json.dumps(vocab, ensure_ascii=False, indent=1).encode('utf-8')),
    ('special_ids.json', json.dumps(special_ids.to_dict()).encode('utf-8')),
  ):
    tmp = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.path.join(directory, name))
