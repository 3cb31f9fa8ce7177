"""Exporting a trained workdir to formats other tools load, and importing HF Marian checkpoints.

`transformer-jax export --workdir=DIR --format=F --out=PATH [--checkpoint=STEP|STEP_DIR] [--dtype=bfloat16]`

One file per format, each a module with NAME, SUMMARY, WRITES_DIRECTORY, check_target(...) and write(...);
FORMATS below is the registry the CLI lists formats from:
  safetensors.py  one file of flat tensors (the `safetensors` package writes and reads it)
  msgpack.py      flax.serialization msgpack of {'params', 'metadata'}
  hf_marian.py    a transformers MarianMTModel directory, and `import --format=hf-marian`
  hf_gpt2.py      a transformers GPT2LMHeadModel directory (language models), and `import --format=hf-gpt2`
  stablehlo.py    jax.export of greedy translation with the parameters baked in
  ctranslate2.py  a directory CTranslate2 loads (Translator / Generator; the optional [serve] extra)
files.py holds what they share (Exportable, ExportError, target checks, atomic writes).

Every file format also writes `spm.model` (the SentencePiece model) beside PATH. An existing non-empty target is
never replaced without `overwrite=True` (`--overwrite`); every target is checked before anything is written, and
files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from transformer_jax import parallel
from transformer_jax.training import train_state
from transformer_jax.storage import layout as layout_lib
from transformer_jax.inference import workdir as workdir_lib
from transformer_jax.export import ctranslate2 as ctranslate2_format
from transformer_jax.export import files
from transformer_jax.export import hf_gpt2
from transformer_jax.export import hf_marian
from transformer_jax.export import msgpack as msgpack_format
from transformer_jax.export import safetensors as safetensors_format
from transformer_jax.export import stablehlo
from transformer_jax.export.files import (
  DTYPES,
  FORMAT_TAG,
  TOKENIZER_NAME,
  ExportError,
  Exportable,
  cast,
  flatten,
  unflatten,
)
from transformer_jax.export.hf_marian import (
  from_marian_state_dict,
  import_hf_marian,
  marian_config,
  marian_vocab,
  to_marian_state_dict,
)
from transformer_jax.export.safetensors import read_safetensors, write_safetensors
from transformer_jax.export.stablehlo import load_stablehlo, serving_function, stablehlo_bytes, stablehlo_export

FORMATS = {
  module.NAME: module
  for module in (safetensors_format, msgpack_format, hf_marian, stablehlo, hf_gpt2, ctranslate2_format)
}

__all__ = [
  'DTYPES',
  'FORMATS',
  'FORMAT_TAG',
  'TOKENIZER_NAME',
  'ExportError',
  'Exportable',
  'cast',
  'check_target',
  'export',
  'flatten',
  'from_marian_state_dict',
  'import_hf_marian',
  'load_checkpoint',
  'load_export',
  'load_params',
  'load_stablehlo',
  'marian_config',
  'marian_vocab',
  'read_safetensors',
  'serving_function',
  'stablehlo_bytes',
  'stablehlo_export',
  'to_marian_state_dict',
  'unflatten',
  'write_checkpoint',
  'write_safetensors',
]


def check_target(
  fmt: str, out: str, *, dtype: str = 'float32', overwrite: bool = False, tokenizer_path: str | None = None
) -> None:
  """Refuses (ExportError) an unknown format or dtype, or a target that exists, before any work is done."""
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
  if dtype not in DTYPES:
    raise ExportError(f'unknown dtype {dtype!r}; expected one of {", ".join(DTYPES)}')
  if not out:
    raise ExportError('--out is required')
  FORMATS[fmt].check_target(out, dtype=dtype, overwrite=overwrite, tokenizer_path=tokenizer_path)


# Formats whose models attend to every earlier position: a model trained with a local window is another function.
WINDOWLESS_FORMATS = (hf_marian.NAME, hf_gpt2.NAME)


def export(
  source: Exportable,
  fmt: str,
  out: str,
  *,
  dtype: str = 'float32',
  overwrite: bool = False,
  platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu'),
) -> list[str]:
  """Writes `source` as `fmt` to `out`; returns the paths written."""
  window = getattr(source.cfg, 'attention_window', 0)
  if window and fmt in WINDOWLESS_FORMATS:
    raise ExportError(
      f'{fmt} cannot express model.attention_window={window} (its models attend to every position); '
      'export safetensors, msgpack or stablehlo'
    )
  check_target(fmt, out, dtype=dtype, overwrite=overwrite, tokenizer_path=source.tokenizer_path)
  return FORMATS[fmt].write(source, out, dtype=dtype, overwrite=overwrite, platforms=platforms)


def _host_device():
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return jax.local_devices()[0]


def load_checkpoint(workdir: str, checkpoint: str | int | None = None, config=None) -> Exportable:
  """Parameters of the newest good checkpoint of workdir (or `checkpoint`: a step number or a step directory such
  as WORKDIR/checkpoints/400), restored onto one host device (parameters only); config from the checkpoint unless
  given."""
  root, step = workdir, None
  if checkpoint is not None and str(checkpoint) != '':
    text = str(checkpoint).rstrip('/')
    if text.isdigit():
      step = int(text)
    elif os.path.isdir(text) and os.path.basename(text).isdigit():
      step = int(os.path.basename(text))
      root = os.path.dirname(os.path.dirname(os.path.abspath(text)))  # WORKDIR/checkpoints/STEP -> WORKDIR
    else:
      raise ExportError(f'--checkpoint={checkpoint} is neither a step number nor a checkpoint step directory')
  run = workdir_lib.Workdir(root)
  given = run.layout if root is workdir else layout_lib.of(workdir)
  if not files.paths.exists(run.tokenizer_path) and files.paths.exists(given.tokenizer):
    run.tokenizer_path = given.tokenizer
  if os.path.isdir(run.marian_dir):  # an imported Marian vocabulary (data/marian_vocab.py)
    run.tokenizer_path = run.marian_dir
  if config is None:
    config = run.stored_config(step)
  one_device = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, dcn_data=1, num_devices=0))
  trained = run.load(config, step=step, mesh=parallel.make_mesh(one_device, devices=[_host_device()]))  # on the host
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), trained.params)
  return Exportable(config=config, cfg=trained.cfg, params=params, tokenizer_path=run.tokenizer_path, step=trained.step)


def load_params(path: str) -> tuple[dict, dict[str, Any]]:
  """(parameter tree, metadata) of a safetensors or msgpack export; metadata['config'] is a ConfigDict and
  metadata['tokenizer'] the path of the SentencePiece model beside the file. Arrays keep the stored dtype."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} is not a file')
  try:
    return _load_params(path)
  except ExportError:
    raise
  except Exception as e:  # (safetensors, msgpack, json, numpy raise many types on damage)
    raise ExportError(
      f'{path} is damaged or not a transformer_jax export ({type(e).__name__}: '
      f'{str(e).splitlines()[0][:120] if str(e) else "unreadable"}); export it again'
    ) from None


def _load_params(path: str) -> tuple[dict, dict[str, Any]]:
  if safetensors_format.is_safetensors(path):
    tensors, metadata = read_safetensors(path)
    params = unflatten(tensors)
  else:
    params, metadata = msgpack_format.read(open(path, 'rb').read(), path)
    params = jax.tree.map(np.asarray, params)
  if 'config' in metadata:
    try:
      metadata['config'] = ml_collections.ConfigDict(json.loads(metadata['config']))
    except ValueError as e:
      raise ExportError(f'{path} has an unreadable config in its metadata ({e}); export it again') from e
  if 'tokenizer' in metadata:
    metadata['tokenizer'] = os.path.join(os.path.dirname(os.path.abspath(path)), metadata['tokenizer'])
  return params, metadata


def load_export(path: str) -> Exportable:
  """An Exportable (config, ModelConfig, float32 params, tokenizer) from a safetensors or msgpack export."""
  params, metadata = load_params(path)
  if 'config' not in metadata:
    raise ExportError(f'{path} has no config metadata: not written by transformer-jax export')
  config = metadata['config']
  return Exportable(
    config=config,
    cfg=train_state.model_config(config),
    params=cast(params, 'float32'),
    tokenizer_path=metadata.get('tokenizer', ''),
    step=int(metadata.get('step', 0)),
  )


def write_checkpoint(workdir: str, config, params, step: int = 0) -> None:
  """A checkpoint of `params` (a fresh optimizer state) in workdir (see workdir.Workdir.write_checkpoint)."""
  workdir_lib.Workdir(workdir).write_checkpoint(config, params, step=step)
