"""Packing variable-length (inputs, targets) examples into fixed-length rows.

Inputs and targets have their own row lengths, because sources and targets of a task can have
very different lengths (on the default task English sources are about 3x longer than German
targets): one shared length would leave most target slots empty.

Per row, segment k (1-based) holds the k-th example placed in that row, in both `inputs` and
`targets`; positions restart at 0 for every segment. Padding is 0 everywhere.

The decoder's shifted-right inputs are *not* built here: the model shifts `targets` right per
segment (BOS at each position 0), so a packed second sentence never starts from the previous
sentence's EOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KEYS = ('inputs', 'targets', 'inputs_segmentation', 'targets_segmentation', 'inputs_position', 'targets_position')


def _place(in_lens: np.ndarray, tg_lens: np.ndarray, inputs_length: int, targets_length: int, max_open_rows: int):
  """Greedy first-fit over a window of at most `max_open_rows` open rows.

  Returns per-example (row, input offset, target offset, segment id) and the number of rows.
  When the window is full and nothing fits, the oldest open row is closed. Rows that cannot
  take even the smallest example (1 input + 1 target token) are closed at once.
  """
  n = len(in_lens)
  row = np.empty(n, np.int64)
  in_off = np.empty(n, np.int64)
  tg_off = np.empty(n, np.int64)
  seg = np.empty(n, np.int64)
  # The open window, oldest first: parallel lists of row id, free input/target slots, segments used.
  w_row: list[int] = []
  w_in: list[int] = []
  w_tg: list[int] = []
  w_seg: list[int] = []
  num_rows = 0
  in_list = in_lens.tolist()
  tg_list = tg_lens.tolist()
  for i in range(n):
    li = in_list[i]
    lt = tg_list[i]
    j = -1
    for k in range(len(w_row)):
      if w_in[k] >= li and w_tg[k] >= lt:
        j = k
        break
    if j < 0:
      if len(w_row) >= max_open_rows:
        del w_row[0], w_in[0], w_tg[0], w_seg[0]
      w_row.append(num_rows)
      w_in.append(inputs_length)
      w_tg.append(targets_length)
      w_seg.append(0)
      num_rows += 1
      j = len(w_row) - 1
    row[i] = w_row[j]
    in_off[i] = inputs_length - w_in[j]
    tg_off[i] = targets_length - w_tg[j]
    w_seg[j] += 1
    seg[i] = w_seg[j]
    w_in[j] -= li
    w_tg[j] -= lt
    if w_in[j] < 1 or w_tg[j] < 1:
      del w_row[j], w_in[j], w_tg[j], w_seg[j]
  return row, in_off, tg_off, seg, num_rows


def _fill(
  tokens: list[np.ndarray],
  lens: np.ndarray,
  row: np.ndarray,
  off: np.ndarray,
  seg: np.ndarray,
  num_rows: int,
  length: int,
):
  """Scatters every example's tokens to its row and offset (vectorised)."""
  data = np.zeros((num_rows, length), np.int32)
  segmentation = np.zeros((num_rows, length), np.int32)
  position = np.zeros((num_rows, length), np.int32)
  total = int(lens.sum())
  if total:
    flat_tokens = np.concatenate(tokens).astype(np.int32, copy=False)
    starts = np.cumsum(lens) - lens  # start of each example in flat_tokens
    pos = np.arange(total) - np.repeat(starts, lens)  # position within the example
    dest = np.repeat(row * length + off, lens) + pos  # flat destination index
    data.reshape(-1)[dest] = flat_tokens
    segmentation.reshape(-1)[dest] = np.repeat(seg, lens)
    position.reshape(-1)[dest] = pos
  return data, segmentation, position


def pack_examples(
  examples: Sequence[tuple[Sequence[int], Sequence[int]]],
  inputs_length: int,
  targets_length: int,
  *,
  max_open_rows: int = 64,
) -> dict[str, np.ndarray]:
  """Packs (inputs, targets) token lists (EOS already included) into rows.

  Deterministic and order-preserving: rows are numbered in the order they are opened and the
  segments of a row are in input order. An example goes into the first open row where BOTH
  its inputs and targets fit. Raises ValueError for an example longer than a row or with an
  empty side (the pipeline filters or truncates first).

  Returns int32 arrays `inputs`, `inputs_segmentation`, `inputs_position` of shape
  [num_rows, inputs_length] and `targets`, `targets_segmentation`, `targets_position` of
  shape [num_rows, targets_length].
  """
  if max_open_rows < 1:
    raise ValueError(f'max_open_rows must be >= 1, got {max_open_rows}')
  n = len(examples)
  in_tokens = [np.asarray(ex[0], np.int32).reshape(-1) for ex in examples]
  tg_tokens = [np.asarray(ex[1], np.int32).reshape(-1) for ex in examples]
  in_lens = np.fromiter((len(t) for t in in_tokens), np.int64, count=n)
  tg_lens = np.fromiter((len(t) for t in tg_tokens), np.int64, count=n)
  if n:
    bad = np.flatnonzero((in_lens > inputs_length) | (tg_lens > targets_length) | (in_lens < 1) | (tg_lens < 1))
    if bad.size:
      i = int(bad[0])
      raise ValueError(
        f'{bad.size} example(s) cannot be packed into rows of {inputs_length} input / '
        f'{targets_length} target tokens, e.g. example {i} with lengths '
        f'({int(in_lens[i])}, {int(tg_lens[i])}); filter or truncate them first '
        '(every side needs at least its EOS)'
      )
  row, in_off, tg_off, seg, num_rows = _place(in_lens, tg_lens, inputs_length, targets_length, max_open_rows)
  inputs, inputs_seg, inputs_pos = _fill(in_tokens, in_lens, row, in_off, seg, num_rows, inputs_length)
  targets, targets_seg, targets_pos = _fill(tg_tokens, tg_lens, row, tg_off, seg, num_rows, targets_length)
  return {
    'inputs': inputs,
    'targets': targets,
    'inputs_segmentation': inputs_seg,
    'targets_segmentation': targets_seg,
    'inputs_position': inputs_pos,
    'targets_position': targets_pos,
  }


def pack_flat(
  in_tokens: np.ndarray,
  in_lens: np.ndarray,
  tg_tokens: np.ndarray,
  tg_lens: np.ndarray,
  inputs_length: int,
  targets_length: int,
  *,
  max_open_rows: int = 64,
) -> dict[str, np.ndarray]:
  """`pack_examples` for examples given as flat token arrays + per-example lengths (EOS included).

  The same placement and output; no per-example Python objects (the streaming pipeline packs
  memmapped shards this way). The caller guarantees 1 <= lengths <= the row lengths.
  """
  if max_open_rows < 1:
    raise ValueError(f'max_open_rows must be >= 1, got {max_open_rows}')
  in_lens = np.asarray(in_lens, np.int64)
  tg_lens = np.asarray(tg_lens, np.int64)
  row, in_off, tg_off, seg, num_rows = _place(in_lens, tg_lens, inputs_length, targets_length, max_open_rows)
  inputs, inputs_seg, inputs_pos = _fill([in_tokens], in_lens, row, in_off, seg, num_rows, inputs_length)
  targets, targets_seg, targets_pos = _fill([tg_tokens], tg_lens, row, tg_off, seg, num_rows, targets_length)
  return {
    'inputs': inputs,
    'targets': targets,
    'inputs_segmentation': inputs_seg,
    'targets_segmentation': targets_seg,
    'inputs_position': inputs_pos,
    'targets_position': targets_pos,
  }


def packing_efficiency(packed: dict[str, np.ndarray]) -> float:
  """Fraction of target slots holding a real token (real target tokens / target slots)."""
  seg = packed['targets_segmentation']
  return float(np.count_nonzero(seg)) / seg.size if seg.size else 0.0


def inputs_efficiency(packed: dict[str, np.ndarray]) -> float:
  """Fraction of input slots holding a real token."""
  seg = packed['inputs_segmentation']
  return float(np.count_nonzero(seg)) / seg.size if seg.size else 0.0


def unpack_examples(packed: dict[str, np.ndarray]) -> list[tuple[list[int], list[int]]]:
  """Inverse of `pack_examples` (row by row, segment by segment); used by tests and tools."""
  out = []
  for r in range(packed['inputs'].shape[0]):
    s_in = packed['inputs_segmentation'][r]
    s_tg = packed['targets_segmentation'][r]
    for k in range(1, int(s_in.max(initial=0)) + 1):
      out.append((packed['inputs'][r][s_in == k].tolist(), packed['targets'][r][s_tg == k].tolist()))
  return out
