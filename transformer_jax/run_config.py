"""Which config a command runs with on a workdir: the one given, or the one stored with its checkpoint.

`train` / `evaluate` / `translate --workdir=DIR` without `--config=FILE` on a workdir that holds a checkpoint (trained
or imported) run with the config stored in its newest checkpoint, with the command line's `--config.key=value`
overrides applied on top (dataset, steps, learning rate, ...). An override that would change the architecture the
checkpoint was made with is refused in one line. With `--config=FILE`, that file (and its overrides) is used as
given; on a workdir without checkpoints, the default config file.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from transformer_jax.storage import layout as layout_lib
from transformer_jax import errors

# Keys whose value is part of the checkpoint: the parameters' shapes and meaning, or the vocabulary they index.
ARCHITECTURE_KEYS = (
  'model.vocab_size',
  'model.num_layers',
  'model.d_model',
  'model.num_heads',
  'model.d_ff',
  'model.share_embeddings',
  'model.pre_norm',
  'model.positional',
  'model.kind',
  'model.activation',
  'model.use_bias',
  'model.scale_embeddings',
  'model.final_logits_bias',
  'model.special_ids',
  'model.scan_layers',
  'vocabulary',
)

# What the default config has when a stored config predates the key (same defaults as ModelConfig / the tokenizer).
_DEFAULTS = {
  'model.pre_norm': False,
  'model.positional': 'sinusoidal',
  'model.kind': 'encoder_decoder',
  'model.activation': 'relu',
  'model.use_bias': False,
  'model.scale_embeddings': True,
  'model.final_logits_bias': False,
  'model.scan_layers': False,
  'vocabulary': 'sentencepiece',
}


class ArchitectureOverrideError(errors.UserError, ValueError):
  """An override that changes what the workdir's checkpoint was made with."""


def _get(config, path: str, default: Any = None) -> Any:
  node = config
  for part in path.split('.'):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
      return default
    node = node[part]
  return node


def _set(config, path: str, value: Any) -> None:
  *parents, last = path.split('.')
  node = config
  for part in parents:
    if part not in node:
      node[part] = ml_collections.ConfigDict()
    node = node[part]
  node[last] = value


def _has_checkpoint(workdir: layout_lib.WorkdirLayout | None) -> bool:
  if not workdir:
    return False
  from transformer_jax.storage import paths

  directory = workdir.checkpoints
  return paths.isdir(directory) and any(name.isdigit() for name in paths.listdir(directory))  # gs:// too


def stored_with_overrides(stored, overrides: dict[str, Any], workdir: str) -> ml_collections.ConfigDict:
  """`stored` (a checkpoint's config) with `overrides` ({'a.b': value}) applied; architecture changes refused."""
  config = ml_collections.ConfigDict(stored.to_dict() if hasattr(stored, 'to_dict') else dict(stored))
  for path, value in overrides.items():
    if path in ARCHITECTURE_KEYS or path.startswith('model.special_ids.'):
      have = _get(config, path, _DEFAULTS.get(path))
      if have != value:
        raise ArchitectureOverrideError(
          f'--config.{path}={value!r} changes the architecture of the checkpoint in {workdir} (stored {path}={have!r}; '
          "its parameters' shapes and meaning are fixed): drop the override, or train from scratch in a new --workdir"
        )
      continue
    _set(config, path, value)
  return config


def resolve(
  workdir: str | layout_lib.WorkdirLayout | None, config, *, explicit: bool, overrides: dict[str, Any] | None = None
):
  """The config to run with (see the module docstring). `explicit`: --config=FILE was on the command line."""
  workdir = layout_lib.of(workdir) if workdir else None
  if explicit or not _has_checkpoint(workdir):
    return config
  from transformer_jax.inference import workdir as workdir_lib

  return stored_with_overrides(workdir_lib.Workdir(workdir).stored_config(), dict(overrides or {}), workdir.root)
