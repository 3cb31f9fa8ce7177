"""Orbax checkpoints: async, atomic saves of the train state, the data position and the config; sharded restore.

One checkpoint (a step directory under WORKDIR/checkpoints) holds three items:
  state   TrainState (step, params, optimizer state) - restored straight onto the target shardings
  data    the input pipeline's position (plain ints, JSON)
  config  the ConfigDict it was made with (JSON), so a workdir can be evaluated/exported without flags
The RNG needs no item: the per-step key is fold_in(PRNGKey(config.seed), step).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

ITEMS = ('state', 'data', 'config')


class ArchitectureMismatchError(ValueError):
  """The checkpoint's parameters do not fit the model the config builds."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager: what this trainer saves and how it falls back on damage."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
                                           read_only=read_only)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config_json))
    return self.manager.save(step, args=args, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']

  def check_compatible(self, step: int, abstract_state) -> None:
    """Refuses a checkpoint of another architecture/vocabulary, naming the first mismatching parameter."""
    saved = self.manager.item_metadata(step)['state']
    saved_params = getattr(saved, 'tree', saved)['params'] if not isinstance(saved, dict) else saved['params']
    want = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    have = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(saved_params)[0]}
    for path, leaf in want:
      name = jax.tree_util.keystr(path)
      if name not in have:
        raise ArchitectureMismatchError(
            f'checkpoint step {step} in {self.directory} has no parameter {name} (model expects shape '
            f'{tuple(leaf.shape)}): it was made with another architecture')
      shape = tuple(getattr(have[name], 'shape', ()))
      if shape != tuple(leaf.shape):
        raise ArchitectureMismatchError(
            f'checkpoint step {step} parameter {name} has shape {shape} but the model expects {tuple(leaf.shape)}: '
            f'it was made with another architecture or vocabulary')
    if len(have) != len(want):
      extra = sorted(set(have) - {jax.tree_util.keystr(p) for p, _ in want})
      raise ArchitectureMismatchError(f'checkpoint step {step} has parameters the model lacks, first {extra[0]}')

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores the newest good checkpoint (or `step`) onto abstract_state's shardings.

    A damaged newest checkpoint is reported and skipped; an architecture mismatch is raised, never skipped.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    last_error = None
    for s in steps:
      try:
        self.check_compatible(s, abstract_state)
        restored = self.manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return restored['state'], dict(restored['data']), s
      except ArchitectureMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        last_error = e
        logging.warning('checkpoint step %d in %s is unreadable (%s: %s); trying the previous one', s,
                        self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else '')
        print(f'warning: checkpoint step {s} is damaged ({type(e).__name__}); trying the previous one', flush=True)
    raise RuntimeError(f'no readable checkpoint in {self.directory}: {last_error}')


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def average_trees(trees: list) -> Any:
  """Element-wise mean, accumulated in float64 on the host so the result does not depend on order."""
  if not trees:
    raise ValueError('nothing to average')
  total = jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), trees[0])
  for t in trees[1:]:
    total = jax.tree.map(lambda a, x: a + np.asarray(x, dtype=np.float64), total, t)
  return jax.tree.map(lambda a, x: (a / len(trees)).astype(np.asarray(x).dtype), total, trees[0])
