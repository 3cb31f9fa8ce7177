"""Range checks of every numeric config value, and of paths, before anything is read or written.

`config_errors(config)` returns one line per bad key (empty: all good). The CLI prints each as `error: ...` and exits
2 with the workdir untouched, so `--config.num_train_steps=-5` or `--config.learning_rate=nan` never start a run.
Keys a config lacks are not checked (configs may leave optional keys out); None is accepted where the base config
declares a placeholder (max_train_examples, max_eval_examples).
"""

from __future__ import annotations

import math
import os
from typing import Any
from collections.abc import Callable

# (key, check, what it must be). A check takes the value and returns True when it is good.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and v >= low), f'an integer >= {low}'


def _optional_int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v is None or (_is_int(v) and v >= low)), f'an integer >= {low} (or None)'


def _positive() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_real(v) and math.isfinite(v) and v > 0), 'a finite number > 0'


def _non_negative() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_real(v) and math.isfinite(v) and v >= 0), 'a finite number >= 0'


def _fraction() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_real(v) and math.isfinite(v) and 0 <= v < 1), 'a number in [0, 1)'


def _mesh_size() -> tuple[Callable[[Any], bool], str]:
  return (lambda v: _is_int(v) and (v == -1 or v >= 1)), 'an integer >= 1, or -1 (all remaining devices)'


RULES: tuple[tuple[str, tuple[Callable[[Any], bool], str]], ...] = (
  ('num_train_steps', _int_at_least(1)),
  ('batch_size', _int_at_least(1)),
  ('grad_accum_steps', _int_at_least(1)),
  ('max_length', _int_at_least(2)),  # EOS plus at least one token
  ('packed_inputs_length', _int_at_least(2)),
  ('packed_targets_length', _int_at_least(2)),
  ('max_train_examples', _optional_int_at_least(1)),
  ('max_eval_examples', _optional_int_at_least(1)),
  ('tokenizer_train_sentences', _int_at_least(1)),
  ('learning_rate', _positive()),
  ('warmup_steps', _int_at_least(0)),
  ('cooldown_fraction', _fraction()),  # of num_train_steps; 0: none
  ('adam_beta1', _fraction()),
  ('adam_beta2', _fraction()),
  ('adam_eps', _positive()),
  ('grad_clip_norm', _non_negative()),  # 0: no clipping
  ('label_smoothing', _fraction()),
  ('stall_patience_steps', _int_at_least(0)),  # 0: off
  ('seed', _int_at_least(0)),
  ('log_every_steps', _int_at_least(1)),
  ('eval_every_steps', _int_at_least(1)),
  ('eval_translate_examples', _int_at_least(0)),
  ('eval_translate_batch_size', _int_at_least(1)),
  ('checkpoint_every_steps', _int_at_least(1)),
  ('keep_checkpoints', _int_at_least(1)),
  ('model.vocab_size', _int_at_least(5)),  # the 4 special ids and at least one piece
  ('model.num_layers', _int_at_least(1)),
  ('model.d_model', _int_at_least(1)),
  ('model.num_heads', _int_at_least(1)),
  ('model.d_ff', _int_at_least(1)),
  ('model.dropout_rate', _fraction()),
  ('model.attention_window', _int_at_least(0)),  # 0: full attention
  ('model.attention_block_size', _int_at_least(1)),
  ('mesh.data', _mesh_size()),
  ('mesh.fsdp', _mesh_size()),
  ('mesh.tensor', _mesh_size()),
  ('mesh.dcn_data', _int_at_least(1)),
  ('mesh.num_devices', _int_at_least(0)),  # 0: all
)

_MISSING = object()


def _get(config, key: str):
  node = config
  for part in key.split('.'):
    try:
      node = node[part]
    except (KeyError, TypeError, AttributeError):
      return _MISSING
  return node


def config_errors(config, *, platform_checks: bool = True, length_checks: bool = True) -> list[str]:
  """One message per bad key: `config KEY=VALUE: must be ...`. Cross-key rules follow the per-key ones.
  platform_checks: also what this host cannot run (splash attention off TPU). length_checks: also that the
  attention block divides the training lengths (training pads nothing; inference lengths are a batch's own)."""
  errors = []
  for key, (good, what) in RULES:
    value = _get(config, key)
    if value is not _MISSING and not good(value):
      errors.append(f'config {key}={value!r}: must be {what}')
  bad = {e.split('=', 1)[0].removeprefix('config ') for e in errors}

  def ok(*keys):
    return all(k not in bad and _get(config, k) is not _MISSING and _get(config, k) is not None for k in keys)

  if ok('model.d_model', 'model.num_heads') and _get(config, 'model.d_model') % _get(config, 'model.num_heads'):
    errors.append(
      f'config model.d_model={_get(config, "model.d_model")}: must be divisible by '
      f'model.num_heads={_get(config, "model.num_heads")}'
    )
  for key in ('packed_inputs_length', 'packed_targets_length'):
    if ok(key, 'max_length') and _get(config, key) < _get(config, 'max_length'):
      errors.append(
        f'config {key}={_get(config, key)}: must be >= max_length={_get(config, "max_length")} (a '
        'packed row holds at least one whole example)'
      )
  if ok('batch_size', 'grad_accum_steps') and _get(config, 'batch_size') % _get(config, 'grad_accum_steps'):
    errors.append(
      f'config grad_accum_steps={_get(config, "grad_accum_steps")}: must divide '
      f'batch_size={_get(config, "batch_size")} (each micro-batch takes batch_size/grad_accum_steps rows)'
    )
  return errors + _attention_errors(config, bad, platform_checks, length_checks)


def _attention_errors(config, bad: set[str], platform_checks: bool, length_checks: bool) -> list[str]:
  """The one check of model.attention (attention.py's switch): a known kind; the block of blockwise and splash divides
  the trained lengths; splash blocks are whole lanes; `train` runs splash only on a TPU. 'auto' pads nothing (it
  picks splash only where the lengths fit), so it has no length rule; nor have dense and cudnn."""
  kind = _get(config, 'model.attention')
  if kind is _MISSING or kind in ('dense', 'cudnn', 'auto'):
    return []
  from transformer_jax.model import attention  # (jax: only for the block kernels)

  if kind not in attention.KINDS:
    return [f'config model.attention={kind!r}: must be one of {", ".join(attention.KINDS)}']
  errors = []
  block = _get(config, 'model.attention_block_size')
  if length_checks and _is_int(block) and 'model.attention_block_size' not in bad:
    for key in ('max_length', 'packed_inputs_length', 'packed_targets_length'):
      length = _get(config, key)
      if not _is_int(length) or key in bad:
        continue
      used = attention.block_for(length, block, kind)
      if length % used == 0:
        continue
      if kind == 'splash':  # splash pads a length shorter than the block up to its 128 lanes: refused as waste
        errors.append(
          f'config {key}={length}: splash attention runs blocks of {used} (model.attention_block_size='
          f'{block}, or the length rounded up to a multiple of 128 when shorter); {key} must be a '
          f'multiple of {used}'
        )
      else:
        errors.append(
          f'config model.attention_block_size={block}: must divide {key}={length}, or be at least {key} (one block)'
        )
  if kind == 'splash' and _is_int(block) and block % 128:
    errors.append(f'config model.attention_block_size={block}: splash blocks must be multiples of 128 (its lanes)')
  if platform_checks and kind == 'splash':
    import jax

    if jax.default_backend() != 'tpu':
      errors.append(
        f"config model.attention='splash': a TPU kernel, and this host runs {jax.default_backend()}; use "
        "'blockwise' (the same exact attention) or 'auto'"
      )
  return errors


# What loading a workdir needs of a stored config (checkpoint config item): without these it is not a trainer config.
REQUIRED = (
  'dataset',
  'source_lang',
  'target_lang',
  'max_length',
  'lr_schedule',
  'learning_rate',
  'warmup_steps',
  'adam_beta1',
  'adam_beta2',
  'adam_eps',
  'model.vocab_size',
  'model.num_layers',
  'model.d_model',
  'model.num_heads',
  'model.d_ff',
  'mesh.data',
  'mesh.fsdp',
  'mesh.tensor',
)


def stored_config_errors(config: dict) -> list[str]:
  """Problems of a config read back from a checkpoint: missing keys first, then the range checks."""
  missing = [k for k in REQUIRED if _get(config, k) is _MISSING]
  # A splash-trained TPU run's config is still readable on a CPU host (export, inspection).
  return ([f'no key {", ".join(missing)}'] if missing else []) + config_errors(config, platform_checks=False)


# ---------------------------------------------------------------------------------------------------------------------
# Paths


def directory_error(path: str | None, flag: str) -> str | None:
  """Why `path` cannot be (or become) a directory: a scheme other than gs://, or it is a file, or one of its parents
  is. None when fine."""
  from transformer_jax.storage import paths

  if not path or '://' in path:
    return paths.check(path, flag)
  probe = os.path.abspath(path)
  while True:
    if os.path.exists(probe):
      if os.path.isdir(probe):
        return None
      if probe == os.path.abspath(path):
        return f'{flag}={path} is a file, not a directory'
      return f'{flag}={path}: {probe} is a file, not a directory'
    parent = os.path.dirname(probe)
    if parent == probe:
      return None
    probe = parent


def file_error(path: str | None, flag: str) -> str | None:
  """Why `path` cannot be read as a file: an unsupported scheme, or it is a directory. None when fine (absence is the
  caller's to report)."""
  from transformer_jax.storage import paths

  if path and '://' in path:
    return paths.check(path, flag)
  if path and '://' not in path and os.path.isdir(path):
    return f'{flag}={path} is a directory, not a file'
  return None
