"""A trained run on disk: opening it for inference, for training, and writing a checkpoint into it.

Its files' names are storage/layout.py's (WorkdirLayout); the checkpoints' items are training/checkpoint.py's.
(WORKDIR may be gs://bucket/path: paths.py. There metrics are numbered parts metrics/*.jsonl, not one appended file,
and a step counts only with Orbax's commit_success.txt; metrics.read_metrics reads both layouts.)

Who uses what:
  evaluate / translate / export   `Workdir(path).load()`: config + tokenizer + PARAMETERS ONLY (an Orbax partial
                                  restore: Adam's moments, twice the parameters' bytes, are never read)
  train                           training/checkpoint.py's Checkpointer on the layout: the full TrainState + data
                                  position (resume)
  import / average                `write_checkpoint(...)`: a new checkpoint of given parameters (fresh or copied
                                  optimizer state)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from typing import Any
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax.training import optim
from transformer_jax import parallel
from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths
from transformer_jax.training import train_state
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.model.transformer import ModelConfig, build_model
from transformer_jax import errors

TOKENIZER_NAME = layout_lib.TOKENIZER_NAME


@dataclasses.dataclass
class Trained:
  """What inference needs from a workdir: the config, the model's config, its parameters and tokenizer."""

  config: ml_collections.ConfigDict
  cfg: ModelConfig
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  mesh: Any
  step: int
  tokenizer_path: str = ''


class Workdir:
  """WORKDIR on disk. Reading never writes (read-only Orbax managers); writing goes through write_checkpoint."""

  def __init__(self, path: str | layout_lib.WorkdirLayout):
    self.layout = layout_lib.of(path)  # its files' names (storage/layout.py)
    self.path = self.layout.root  # a local path (made absolute) or gs://bucket/path
    self.tokenizer_path = self.layout.tokenizer

  @property
  def checkpoint_dir(self) -> str:
    return self.layout.checkpoints

  def checkpointer(self, **kwargs) -> checkpoint_lib.Checkpointer:
    return checkpoint_lib.Checkpointer(self.layout, **kwargs)

  def _reader(self) -> checkpoint_lib.Checkpointer:
    if not paths.isdir(self.checkpoint_dir):
      raise FileNotFoundError(f'no checkpoint in {self.checkpoint_dir}: train first')
    return self.checkpointer(read_only=True)

  def steps(self) -> list[int]:
    if not paths.isdir(self.checkpoint_dir):
      return []
    reader = self._reader()
    try:
      return reader.all_steps()
    finally:
      reader.close()

  def check_resumable(self, abstract_state) -> None:
    """checkpoint_lib.check_resumable on this workdir."""
    checkpoint_lib.check_resumable(self.layout, abstract_state)

  def stored_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    """The config saved with `step` (default: the newest checkpoint whose config reads)."""
    reader = self._reader()
    try:
      _check_step(reader, step)
      return ml_collections.ConfigDict(reader.restore_config(step))
    finally:
      reader.close()

  @property
  def marian_dir(self) -> str:
    """An imported Marian model's vocabulary (data/marian_vocab.py), used instead of spm.model when present."""
    return self.layout.marian_dir

  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    from transformer_jax.data import marian_vocab

    if marian_vocab.is_marian_dir(self.marian_dir):
      return marian_vocab.MarianVocab.load(self.marian_dir)
    if not paths.exists(self.tokenizer_path):
      raise FileNotFoundError(f'no tokenizer at {self.tokenizer_path}')
    try:
      return tokenizer_lib.Tokenizer.load(self.tokenizer_path)
    except tokenizer_lib.DamagedTokenizerError as e:  # readers never retrain it: say what is wrong and what to do
      raise tokenizer_lib.DamagedTokenizerError(
        f"the workdir's tokenizer is damaged: {e}; its checkpoints need the spm.model they were trained with (copy "
        'it back from a backup, or retrain in a new workdir)'
      ) from None

  def load(self, config=None, *, step: int | None = None, devices=None, mesh=None) -> Trained:
    """Parameters of the newest good checkpoint (or exactly `step`) restored onto a mesh, with config and tokenizer.

    config: the checkpoint's own unless given. mesh: built from config.mesh over `devices` (default all) unless
    given. Only the parameters are read.
    """
    reader = self._reader()
    try:
      _check_step(reader, step)
      if config is None:
        config = ml_collections.ConfigDict(reader.restore_config(step))
      config = attention_for_this_host(config)
      tokenizer = self.tokenizer()
      mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh, devices=devices)
      cfg = train_state.model_config(config, special_ids=tokenizer.special_ids)
      with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
        abstract = abstract_params(cfg, config, mesh)
        params, step = reader.restore_params(abstract, step=step)
    finally:
      reader.close()
    return Trained(
      config=config,
      cfg=cfg,
      params=params,
      tokenizer=tokenizer,
      mesh=mesh,
      step=int(step),
      tokenizer_path=self.tokenizer_path,
    )

  def write_checkpoint(
    self, config, params, *, step: int = 0, opt_state=None, data_state: dict | None = None, mesh=None
  ) -> None:
    """A new checkpoint of `params` at `step` that load() and the trainer restore.

    opt_state: the optimizer state to store (default: a fresh one, tx.init(params)). data_state: the input
    position (default: the start of the data). Shapes are checked against the model the config builds first.
    """
    model = build_model(train_state.model_config(config))
    tx = optim.make_optimizer(config)
    mesh = mesh if mesh is not None else parallel.make_mesh(config.mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
      shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
      abstract = train_state.abstract_state(model, tx, config, shardings)  # shapes only: nothing is initialised
      check_shapes(params, abstract.params)
      placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), params, shardings.params)
      if opt_state is None:
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(placed)
      state = abstract.replace(
        step=jax.device_put(np.asarray(step, np.int32), shardings.step), params=placed, opt_state=opt_state
      )
      checkpointer = self.checkpointer(keep=int(config.get('keep_checkpoints', 3)), async_save=False)
      checkpointer.save(
        step,
        state,
        data_state if data_state is not None else {'epoch': 0, 'batch': 0, 'step': step},
        json.loads(config.to_json_best_effort()),
        force=True,
      )
      checkpointer.wait()
      checkpointer.close()


def attention_for_this_host(config, platform: str | None = None) -> ml_collections.ConfigDict:
  """config, or off TPU a copy with model.attention='blockwise' where it says 'splash' (a TPU kernel; blockwise is the
  same exact attention in plain JAX), saying so in one line. platform: default jax.default_backend()."""
  model = config.get('model') or {}
  if model.get('attention') != 'splash':
    return config
  platform = platform or jax.default_backend()
  if platform == 'tpu':
    return config
  # A copy: the caller's config (a flag's, say) stays as given. (ConfigDict(a ConfigDict) would share its nodes.)
  config = (
    copy.deepcopy(config)
    if isinstance(config, ml_collections.ConfigDict) and not isinstance(config, ml_collections.FrozenConfigDict)
    else ml_collections.ConfigDict(config)
  )
  config.model.attention = 'blockwise'
  if jax.process_index() == 0:
    print(
      f"note: model.attention='splash' is a TPU kernel and this host runs {platform}: attending with "
      "'blockwise' (the same exact attention)",
      file=sys.stderr,
      flush=True,
    )
  return config


def abstract_params(cfg: ModelConfig, config, mesh):
  """jax.ShapeDtypeStructs of the model's parameters with their NamedShardings on `mesh` (nothing allocated).

  Call under nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES)."""
  model = build_model(cfg)

  def init(rng):  # the dummy batch is made inside the trace, as the trainer's init does
    batch = train_state.dummy_batch(config)
    return model.init({'params': rng}, **batch)['params']

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = parallel.logical_shardings(nn.get_partition_spec(boxed), mesh)
  unboxed = jax.eval_shape(lambda rng: nn.meta.unbox(init(rng)), jax.random.key(0))  # unbox inside a trace
  return checkpoint_lib.abstract_with_shardings(unboxed, shardings)


def trainer_abstract_state(config, devices=None):
  """The trainer's abstract TrainState for config on config.mesh over `devices` (default: all), and that mesh."""
  mesh = parallel.make_mesh(config.mesh, devices=devices)
  model = build_model(train_state.model_config(config))
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(train_state.state_logical_specs(model, tx, config), mesh)
    return train_state.abstract_state(model, tx, config, shardings), mesh


def _check_step(reader: checkpoint_lib.Checkpointer, step: int | None) -> None:
  if not reader.all_steps():
    raise FileNotFoundError(f'no checkpoint in {reader.directory}: train first')
  if step is not None and step not in reader.all_steps():
    raise FileNotFoundError(f'no checkpoint step {step} in {reader.directory} (have {reader.all_steps()})')


class ShapeMismatchError(errors.UserError, ValueError):
  """Parameters that do not fit the model the config builds."""


def check_shapes(params, abstract) -> None:
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(abstract):
    raise ShapeMismatchError('the parameters do not match the model the config builds')
  for (name, want), have in zip(jax.tree_util.tree_flatten_with_path(abstract)[0], jax.tree.leaves(params)):
    if tuple(want.shape) != tuple(np.shape(have)):
      raise ShapeMismatchError(
        f'parameter {jax.tree_util.keystr(name)} has shape {np.shape(have)}, the model expects {tuple(want.shape)}'
      )


def average_workdir(
  workdir: str | layout_lib.WorkdirLayout,
  out: str | layout_lib.WorkdirLayout,
  *,
  last: int,
  config=None,
  build_abstract_state: Callable[[Any], Any] | None = None,
) -> dict:
  """Writes OUT, a workdir whose one checkpoint holds the element-wise mean of workdir's last `last` parameters.

  OUT gets checkpoints/<newest step>/ (state: step and optimizer state copied from the newest checkpoint, params the
  mean; data and config items copied from the newest), spm.model, and averaged.json saying what was averaged.
  Every checkpoint averaged must restore: a damaged one is an error here, not skipped. OUT must not hold
  checkpoints already. `build_abstract_state(config) -> (abstract TrainState with shardings, mesh)` defaults to the
  trainer's on one local device (config: the newest checkpoint's unless given). OUT's config item is the newest
  checkpoint's, mesh included.
  """
  if last < 1:
    raise ValueError(f'--last must be >= 1, got {last}')
  source_layout, out_layout = layout_lib.of(workdir), layout_lib.of(out)
  workdir, out = source_layout.root, out_layout.root
  if out == workdir:
    raise ValueError('--out must be another directory than --workdir')
  source = checkpoint_lib.Checkpointer(source_layout, read_only=True)
  steps = source.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {source.directory}: train first')
  if len(steps) < last:
    raise ValueError(
      f'--last={last} but {source.directory} holds {len(steps)} checkpoints (steps '
      f'{", ".join(map(str, steps))}); raise keep_checkpoints when training or ask for fewer'
    )
  out_checkpoints = out_layout.checkpoints
  if paths.listdir(out_checkpoints):
    raise ValueError(f'{out_checkpoints} already holds checkpoints; --out must be a new or empty directory')
  tokenizer = source_layout.tokenizer
  if not paths.exists(tokenizer):
    raise FileNotFoundError(f'no tokenizer at {tokenizer}')
  chosen = steps[-last:]
  newest = chosen[-1]
  config_json = source.restore_config(newest)
  config = ml_collections.ConfigDict(config_json if config is None else config.to_dict())
  if build_abstract_state is None:  # one device whatever mesh trained it: averaging needs no parallelism
    config.mesh.update(data=1, fsdp=1, tensor=1, dcn_data=1)
    abstract, mesh = trainer_abstract_state(config, devices=jax.local_devices()[:1])
  else:
    abstract, mesh = build_abstract_state(config)
  with jax.set_mesh(mesh):
    params_on_host = []
    newest_state = newest_data = None
    for s in chosen:
      state, data_state, _ = source.restore(abstract, step=s)
      params_on_host.append(jax.device_get(state.params))
      if s == newest:
        newest_state, newest_data = state, data_state
      del state
    averaged = checkpoint_lib.average_trees(params_on_host)
    shardings = jax.tree.map(lambda a: a.sharding, abstract.params)
    params = jax.tree.map(lambda x, sh: jax.device_put(x, sh), averaged, shardings)
    state = newest_state.replace(params=params)
    paths.makedirs(out)
    target = checkpoint_lib.Checkpointer(out_layout, keep=1, async_save=False)
    target.save(newest, state, newest_data, config_json)
    target.wait()
    target.close()
  source.close()
  if jax.process_index() == 0:
    paths.copy_file(tokenizer, out_layout.tokenizer)
    summary = {
      'source': workdir,
      'steps': chosen,
      'params': 'element-wise mean (float64 sum)',
      'optimizer_state': f'copied from step {newest}',
      'step': newest,
    }
    paths.write_text_atomic(out_layout.averaged, json.dumps(summary, indent=1))
  return {'steps': chosen, 'step': newest, 'out': out}
