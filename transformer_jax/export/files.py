"""What every export format shares: the Exportable (a run's parameters + config + tokenizer), one-line refusals,
flat parameter names, target checks done before anything is written, and atomic writes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths
from transformer_jax import errors

DTYPES = ('float32', 'bfloat16')
TOKENIZER_NAME = layout_lib.TOKENIZER_NAME  # an export's tokenizer has the workdir's name for it
FORMAT_TAG = 'transformer_jax'


class ExportError(errors.UserError, ValueError):
  """A one-line refusal: bad target, unknown format, something a format cannot represent."""


@dataclasses.dataclass
class Exportable:
  config: ml_collections.ConfigDict
  cfg: Any  # model.ModelConfig
  params: Any  # nested dict of numpy float32 arrays
  tokenizer_path: str
  step: int


def flatten(params, prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'encoder.layers_0.self_attention.query.kernel': array, ...}."""
  flat = {}
  for key, value in params.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict) or hasattr(value, 'items'):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def cast(params, dtype: str):
  return jax.tree.map(
    lambda x: np.asarray(x).astype(np.dtype(jnp.bfloat16) if dtype == 'bfloat16' else np.float32), params
  )


def metadata(source: Exportable, dtype: str) -> dict[str, str]:
  """What a one-file export carries besides the tensors: enough to rebuild the model and find its tokenizer."""
  return {
    'format': FORMAT_TAG,
    'config': source.config.to_json_best_effort(),
    'tokenizer': TOKENIZER_NAME,
    'step': str(source.step),
    'dtype': dtype,
  }


# ---------------------------------------------------------------------------------------------------------------------
# Targets: checked before anything is written, written atomically


class atomic_open:
  """open(path, 'wb') into a temporary file beside path, renamed into place on success."""

  def __init__(self, path: str):
    self.path = path
    self.tmp = f'{path}.tmp-{os.getpid()}-{time.time_ns()}'

  def __enter__(self):
    self.f = open(self.tmp, 'wb')
    return self.f

  def __exit__(self, exc_type, exc, tb):
    self.f.close()
    if exc_type is None:
      os.replace(self.tmp, self.path)
    elif os.path.exists(self.tmp):
      os.remove(self.tmp)


def read(path: str) -> bytes:
  return paths.read_bytes(path)


def write_bytes(path: str, data: bytes) -> None:
  if paths.is_gcs(path):  # one upload: atomic on GCS
    paths.write_bytes_atomic(path, data)
    return
  with atomic_open(path) as f:
    f.write(data)


def write_json(path: str, obj) -> None:
  write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode('utf-8'))


def check_file_targets(paths_and_bytes: list[tuple[str, bytes | None]], overwrite: bool) -> None:
  """Each target must be absent, identical (for known bytes), or overwrite must be given; never a directory."""
  for path, data in paths_and_bytes:
    if paths.is_gcs(path):
      if paths.exists(path) and not overwrite and (data is None or read(path) != data):
        raise ExportError(f'{path} exists; pass --overwrite to replace it')
      continue
    if os.path.isdir(path):
      raise ExportError(f'{path} is a directory; give a file path')
    if os.path.exists(path) and not overwrite:
      if data is not None and read(path) == data:
        continue
      raise ExportError(f'{path} exists; pass --overwrite to replace it')
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise ExportError(f'{parent} is not a directory')


def check_dir_target(path: str, overwrite: bool) -> None:
  if paths.is_gcs(path):
    if paths.listdir(path) and not overwrite:
      raise ExportError(f'{path} exists and is not empty; pass --overwrite to write into it')
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExportError(f'{path} exists and is not a directory')
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ExportError(f'{path} exists and is not empty; pass --overwrite to write into it')


def config_for_import(path: str, config, what: str) -> ml_collections.ConfigDict:
  """An unlocked copy of `config`, else of the transformer_jax_config.json our export wrote into `path` (the data,
  lengths and optimizer an HF directory does not describe); refused in one line when neither is there."""
  if config is None:
    saved = os.path.join(path, 'transformer_jax_config.json')
    if not os.path.exists(saved):
      raise ExportError(
        f'{path} has no transformer_jax_config.json: pass --config=configs/X.py for the data, '
        f'lengths and optimizer to {what} with'
      )
    with open(saved) as f:
      config = ml_collections.ConfigDict({k: v for k, v in json.load(f).items() if k != 'step'})
  return ml_collections.ConfigDict(config.to_dict())


def tokenizer_beside(out: str) -> str:
  return os.path.join(os.path.dirname(paths.resolve(out)), TOKENIZER_NAME)


def check_file_target(out: str, overwrite: bool, tokenizer_path: str | None) -> None:
  """A one-file format: `out` and the tokenizer copied beside it must be absent (or identical) unless overwrite."""
  tokenizer_bytes = read(tokenizer_path) if tokenizer_path and paths.exists(tokenizer_path) else None
  check_file_targets([(out, None), (tokenizer_beside(out), tokenizer_bytes)], overwrite)


def write_with_tokenizer(source: Exportable, out: str, payload: bytes) -> list[str]:
  """Writes payload to out and the run's SentencePiece model beside it (both atomically)."""
  tokenizer_bytes = read(source.tokenizer_path)
  paths.makedirs(os.path.dirname(paths.resolve(out)))
  write_bytes(out, payload)
  write_bytes(tokenizer_beside(out), tokenizer_bytes)
  return [out, tokenizer_beside(out)]
