"""The vocabulary's special token ids: one small value the tokenizer produces and the model and decoder receive.

The model never imports the data package: it gets these ids through ModelConfig.special_ids. The defaults are the
ids every SentencePiece model this project trains has (and so every workdir written so far): PAD 0, EOS 1, UNK 2,
BOS 3. A released vocabulary (a Marian or GPT-2 one) brings its own.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  pad: int = 0  # padding: masked out of the loss and of attention
  eos: int = 1  # end of sentence: appended to every source and target
  unk: int = 2  # unknown piece: distinct from pad, so unknown tokens are not masked as padding
  bos: int = 3  # decoder start: targets are shifted right per packed example with this id

  def __post_init__(self):
    if self.pad in (self.eos, self.unk) or self.eos == self.unk:
      raise ValueError(f'special ids must be distinct (pad/eos/unk), got {self}')

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values) -> SpecialIds:
    """From a config/JSON mapping; missing keys keep the defaults (a workdir config that holds no ids)."""
    values = dict(values or {})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'unknown special id names {sorted(unknown)}; expected pad, eos, unk, bos')
    return cls(**{k: int(v) for k, v in values.items()})


DEFAULT_SPECIAL_IDS = SpecialIds()
