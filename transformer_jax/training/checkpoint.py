"""Orbax checkpoints: async, atomic saves of the train state, the data position and the config; sharded restore.

One checkpoint is a step directory WORKDIR/checkpoints/<step> with three items:
  state   TrainState (step, params, optimizer state): restored straight onto the target's shardings, so a
          checkpoint written on one mesh (say 8 devices as (2,2,2)) restores onto another (1 device, (4,1,1), ...)
  data    the input pipeline's position (plain ints, JSON); the position is a function of the step alone
  config  the ConfigDict it was made with (JSON), so a workdir can be evaluated/exported without flags
The RNG needs no item: it is derived, never advanced. The trainer splits PRNGKey(config.seed) into (init, step) keys
and the update from step s to s+1 draws its dropout from fold_in(step_key, s) (s = the state's own step counter), so
a resumed run draws the same masks as a straight one.

Saves are orbax's: `CheckpointManager.save` copies the arrays to host memory (the only part that blocks the loop
when async, see benchmarks/checkpoint_blocking.py), writes <step>.orbax-checkpoint-tmp in a background thread and
renames it to <step> when complete, so a kill at any moment leaves either the whole checkpoint or none; leftover
tmp directories are removed when the next trainer starts. The newest `keep` checkpoints are kept.

`restore` reads the whole TrainState (training, resume); `restore_params` only the parameters (an Orbax partial
restore, for inference and export: the optimizer's moments are never read). Opening a trained run for those lives in
workdir.py.

Restore falls back on damage: an unreadable newest checkpoint is reported, moved to WORKDIR/checkpoints_damaged/
(a writable Checkpointer only; so the step can be saved again), and the previous one is restored. A checkpoint of
another architecture or vocabulary is refused, naming the first mismatching parameter and both shapes.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import time
from typing import Any
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths
from transformer_jax import errors

ITEMS = ('state', 'data', 'config')
DAMAGED_DIR = layout_lib.DAMAGED_CHECKPOINTS_NAME

# Orbax saves a replicated array in parts, one per replica (replica-parallel saving), and cuts each part out with an
# eager slice on the device before copying it to the host. For small arrays that costs more than it saves: with
# many data-parallel devices a small model's save cuts hundreds of slices while the training loop waits. Parts
# are cut only when each is at least this large (the large arrays of a big model are still written in parallel).
MIN_REPLICA_PART_BYTES = 4 << 20


def _register_array_handler() -> None:
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that it replaces its default handler: intended, not news
  try:
    ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_PART_BYTES),
      override=True,
    )
  finally:
    logging.set_verbosity(verbosity)


_register_array_handler()


class ArchitectureMismatchError(errors.UserError, ValueError):
  """The checkpoint's parameters do not fit the model the config builds."""


class NoReadableCheckpointError(errors.UserError, FileNotFoundError):
  """Every checkpoint in the directory failed to restore."""


class CheckpointSaveError(errors.UserError, RuntimeError):
  """A save failed (full disk, quota, I/O error): one line naming the step, the directory and, for a full disk, the
  bytes needed. The failed step's temporary directory is removed; earlier checkpoints are untouched."""

  exit_code = errors.FAILED
  quiet_shutdown = True  # orbax's failed background writers report again at exit: to the detail log


class _Params:
  """An object with .params, so check_compatible reads a bare parameter tree as it reads a TrainState."""

  def __init__(self, params):
    self.params = params


def checkpoint_dir(workdir: str | layout_lib.WorkdirLayout) -> str:
  return layout_lib.of(workdir).checkpoints


# How a save that has not finished looks: locally a <step>.orbax-checkpoint-tmp-<time> directory (renamed to <step>
# when complete); on gs:// the <step> directory itself, without the commit marker file (GCS has no rename).
TMP_MARKER = '.orbax-checkpoint-tmp'
COMMIT_MARKER = 'commit_success.txt'
_reported: set[tuple[str, int]] = set()


def incomplete_steps(directory: str) -> list[tuple[int, str]]:
  """(step, why) of each step whose save started and did not finish (killed, or still running): Orbax skips them
  without a word, so a run killed during its first save would start again from step 0 silently."""
  names = paths.listdir(directory)
  committed = {n for n in names if n.isdigit()}
  found = []
  for name in names:
    step, tmp, _ = name.partition(TMP_MARKER)
    if tmp and step.isdigit() and step not in committed:
      found.append((int(step), f'its save did not finish: {name}'))
    elif name.isdigit() and paths.is_gcs(directory) and not paths.exists(paths.join(directory, name, COMMIT_MARKER)):
      found.append((int(name), f'no commit marker {COMMIT_MARKER}'))
  return sorted(found)


def report_incomplete(directory: str) -> list[int]:
  """One `warning:` line per incomplete step (once per process); returns their steps."""
  try:
    found = incomplete_steps(directory)
  except Exception:  # (an unreachable bucket is reported by whoever reads it next)
    return []
  for step, why in found:
    if (directory, step) not in _reported:
      _reported.add((directory, step))
      _warn(f'checkpoint {step} in {directory} is incomplete ({why}): ignored')
  return [step for step, _ in found]


def _handler_registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  """Handlers named up front, so item_metadata (the architecture check) works before any save or restore."""
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add('state', ocp.args.StandardSave)
  registry.add('state', ocp.args.StandardRestore)
  registry.add('state', ocp.args.PyTreeRestore)  # parameters only (partial restore) for inference
  for item in ('data', 'config'):
    registry.add(item, ocp.args.JsonSave)
    registry.add(item, ocp.args.JsonRestore)
  return registry


class Checkpointer:
  """A thin wrapper over ocp.CheckpointManager: what this trainer saves and how it falls back on damage."""

  def __init__(
    self, workdir: str | layout_lib.WorkdirLayout, *, keep: int = 3, async_save: bool = True, read_only: bool = False
  ):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep,
      save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=async_save,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,
    )
    self.layout = layout_lib.of(workdir)
    self.workdir = self.layout.root
    self.directory = self.layout.checkpoints
    self.read_only = read_only
    if jax.process_index() == 0:  # before the manager: a writer's removes the local leftovers
      report_incomplete(self.directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=_handler_registry())
    self._saving: tuple[int, int] | None = None  # (step, bytes) of the newest save started
    self._failed: CheckpointSaveError | None = None

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, config_json: dict, *, force: bool = True) -> bool:
    """Starts saving (returns once the arrays are on the host when async; after the commit when not)."""
    from transformer_jax.training import faults

    self.check_for_errors()  # the previous save's outcome first
    need = tree_nbytes(state)
    free = faults.free_bytes(self.directory) if jax.process_index() == 0 else None
    if free is not None and free < need:  # certain to fail: refuse before anything is written
      raise self._failure(OSError(28, 'No space left on device'), step, need, free)
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config_json)
    )
    self._saving = (step, need)
    try:
      return self.manager.save(step, args=args, force=force)
    except Exception as e:  # (orbax/tensorstore raise many types)
      raise self._failure(e, step, need) from None

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; cheap, so the trainer asks every step and stops
    at the step after the failure. (One process only: hosts could see the end of a save at different steps; with
    several, the failure surfaces at the next save, which waits for the previous one on every host.)"""
    if self._failed is not None:
      raise self._failed
    if self._saving is not None and jax.process_count() == 1 and not self.manager.is_saving_in_progress():
      self.wait()  # the save has ended: this returns at once, raising its failure if it failed

  def wait(self) -> None:
    """Blocks until every started save is committed (renamed into place); CheckpointSaveError if one failed."""
    if self._failed is not None:
      raise self._failed
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:
      raise self._failure(e, *(self._saving or (-1, 0))) from None
    self._saving = None

  def _failure(self, e: BaseException, step: int, need: int, free: int | None = None) -> CheckpointSaveError:
    """The one-line error of a failed save; the traceback goes to the detail log, the half-written step is removed."""
    from transformer_jax.training import faults

    log = faults.log_exception(e, f'saving checkpoint step {step} to {self.directory} failed')
    if jax.process_index() == 0 and not paths.is_gcs(self.directory):  # gs://: no tmp dirs (commit markers)
      for tmp in glob.glob(os.path.join(self.directory, '*.orbax-checkpoint-tmp*')):  # no save is in flight now
        shutil.rmtree(tmp, ignore_errors=True)
    try:
      committed = (
        [s for s in self.manager.all_steps() if s != step]
        if paths.is_gcs(self.directory)
        else [int(n) for n in paths.listdir(self.directory) if n.isdigit() and int(n) != step]
      )
    except Exception:  # (an unreachable bucket: the message stays one line)
      committed = []
    resume = (
      f'training resumes from checkpoint step {max(committed)}' if committed else 'no checkpoint was committed yet'
    )
    if faults.is_disk_full(e):
      free = faults.free_bytes(self.directory) if free is None else free
      if committed:  # what the newest checkpoint takes on this disk (blocks, metadata) beats the arrays' bytes
        need = max(need, _disk_usage(os.path.join(self.directory, str(max(committed)))))
      message = (
        f'no space left in {self.directory} to save checkpoint step {step}: it needs about {need} bytes '
        f'({faults.human_bytes(need)}), {free if free is not None else "unknown"} bytes are free; free '
        f'space or use another --workdir, then rerun ({resume}; details in {log})'
      )
    else:
      message = (
        f'saving checkpoint step {step} to {self.directory} failed ({reason(e)}); details in {log}; rerun ({resume})'
      )
    self._failed = CheckpointSaveError(message)
    return self._failed

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True on every host at the same step once any host got SIGTERM (JAX's preemption sync point)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    if self._failed is None:
      self.wait()
    self.manager.close()

  def restore_config(self, step: int | None = None) -> dict:
    """The config JSON of `step`, or of the newest checkpoint whose config item reads (damaged ones skipped)."""
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    for i, s in enumerate(steps):
      try:
        config = self.manager.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        if not isinstance(config, dict):
          raise ValueError(f'config item is {type(config).__name__}, not a dict')
        from transformer_jax import config_checks

        problems = config_checks.stored_config_errors(config)
        if problems:
          raise ValueError(f'not a trainer config: {problems[0]}')
        return config
      except Exception as e:
        if i == len(steps) - 1:
          raise NoReadableCheckpointError(
            f'no readable config in {self.directory} (step {s}: {reason(e)}); pass '
            '--config=FILE (the config it was trained with) to use its checkpoints '
            'anyway'
          ) from e
        _warn(
          f'the config of checkpoint step {s} in {self.directory} is unreadable ({reason(e)}); trying the previous one'
        )
    raise AssertionError('unreachable')

  def saved_params_metadata(self, step: int):
    """Tree of orbax ArrayMetadata (shape, dtype) of the step's parameters; reads no array data."""
    saved = self.manager.item_metadata(step)['state']
    if saved is None:
      raise ValueError(f'checkpoint step {step} in {self.directory} has no readable state metadata')
    tree = getattr(saved, 'tree', saved)
    return tree['params']

  def check_compatible(self, step: int, abstract_state) -> None:
    """Refuses a checkpoint of another architecture/vocabulary, naming the first mismatching parameter."""
    want = jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    have = {
      jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(self.saved_params_metadata(step))[0]
    }
    for path, leaf in want:
      name = jax.tree_util.keystr(path)
      if name not in have:
        raise ArchitectureMismatchError(
          f'checkpoint step {step} in {self.directory} has no parameter {name} (the model expects shape '
          f'{tuple(leaf.shape)}): it was made with another architecture'
        )
      shape = tuple(getattr(have[name], 'shape', ()))
      if shape != tuple(leaf.shape):
        raise ArchitectureMismatchError(
          f'checkpoint step {step} in {self.directory}: parameter {name} has shape {shape} but the model expects '
          f'{tuple(leaf.shape)}: the checkpoint was made with another architecture or vocabulary (change the '
          f'config back or use a new --workdir)'
        )
    if len(have) != len(want):
      extra = sorted(set(have) - {jax.tree_util.keystr(p) for p, _ in want})
      raise ArchitectureMismatchError(
        f'checkpoint step {step} in {self.directory} has parameters the model lacks, '
        f'first {extra[0]}: it was made with another architecture'
      )

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, int]:
    """Restores the newest good checkpoint (or exactly `step`) onto abstract_state's shardings.

    abstract_state: a tree of jax.ShapeDtypeStruct with the shardings wanted NOW (any mesh, any device count).
    Returns (state, data_state, step). A damaged checkpoint is reported and skipped (and, when writable, moved to
    WORKDIR/checkpoints_damaged/); an architecture mismatch is raised, never skipped.
    """

    def read(s):
      self.check_compatible(s, abstract_state)
      restored = self.manager.restore(
        s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
      )
      if not isinstance(restored['data'], dict):
        raise ValueError(f'data item is {type(restored["data"]).__name__}, not a dict')
      return restored['state'], dict(restored['data'])

    (state, data_state), s = self._restore_newest_good(read, step)
    return state, data_state, s

  def restore_params(self, abstract_params, step: int | None = None) -> tuple[Any, int]:
    """Only the parameters of the newest good checkpoint (or exactly `step`): an Orbax partial restore, so the
    optimizer state is never read. abstract_params: ShapeDtypeStructs with the shardings wanted now.
    Returns (params, step); damage and architecture mismatches are handled as in restore()."""

    def read(s):
      self.check_compatible(s, _Params(abstract_params))
      target = {'params': abstract_params}
      restored = self.manager.restore(
        s,
        args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True
          )
        ),
      )
      return restored['state']['params']

    return self._restore_newest_good(read, step)

  def _restore_newest_good(self, read: Callable[[int], Any], step: int | None) -> tuple[Any, int]:
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    damaged: list[tuple[int, str]] = []
    for s in steps:
      try:
        result = read(s)
      except ArchitectureMismatchError:
        raise
      except Exception as e:  # (tensorstore/orbax raise many types on damage)
        damaged.append((s, reason(e)))
        if step is not None:
          raise NoReadableCheckpointError(f'checkpoint step {s} in {self.directory} is unreadable ({reason(e)})') from e
        _warn(f'checkpoint step {s} in {self.directory} is damaged ({reason(e)}); trying the previous one')
        continue
      if damaged and not self.read_only:
        self._quarantine([d for d, _ in damaged])
      if jax.process_count() > 1:  # every host restored; the quarantine (process 0) is done before anyone saves
        multihost_utils.sync_global_devices('transformer_jax.training.checkpoint.restore')
        self.manager.reload()
      return result, s
    raise NoReadableCheckpointError(
      f'no readable checkpoint in {self.directory}: ' + '; '.join(f'step {s}: {r}' for s, r in damaged)
    )

  def _quarantine(self, steps: list[int]) -> None:
    """Moves damaged step directories out of the manager's way (kept for inspection, never deleted)."""
    if jax.process_index() == 0:
      target_root = self.layout.damaged_checkpoints
      paths.makedirs(target_root)
      for s in steps:
        source = paths.join(self.directory, str(s))
        if not paths.exists(source):
          continue
        target = paths.join(target_root, f'{s}-{time.strftime("%Y%m%d-%H%M%S")}')
        while paths.exists(target):
          target += '_'
        paths.move_tree(source, target)  # gs://: object by object (no directory rename there)
        _warn(f'moved damaged checkpoint step {s} to {target}')
    self.manager.reload()


def check_resumable(workdir: str | layout_lib.WorkdirLayout, abstract_state) -> None:
  """Refuses (ArchitectureMismatchError) a checkpoint of another architecture or vocabulary than
  abstract_state's, reading only the newest readable step's metadata. The trainer asks before it prepares or
  writes anything, so a refused command leaves the workdir as it was; damage is left to the restore to report.

  Every process must take the same path (creating a checkpoint manager synchronises the processes): whether there
  is a checkpoint directory is agreed on, since one process may list it after another has created it."""
  from transformer_jax import parallel

  workdir = layout_lib.of(workdir)
  directory = workdir.checkpoints
  if not parallel.max_over_processes(int(paths.isdir(directory))):
    return
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only: a refusal is one line
  try:
    reader = Checkpointer(workdir, read_only=True)
  finally:
    logging.set_verbosity(verbosity)
  try:
    unreadable = []
    for step in reversed(reader.all_steps()):
      try:
        reader.check_compatible(step, abstract_state)
        return
      except ArchitectureMismatchError:
        raise
      except Exception as e:  # (unreadable metadata: an older step may read)
        unreadable.append(f'step {step}: {reason(e)}')
    if unreadable:  # every step's metadata is damaged: the restore would refuse too, after preparing the data
      raise NoReadableCheckpointError(
        f'no readable checkpoint in {directory}: '
        + '; '.join(unreadable)
        + ' (move the checkpoints away or use a new --workdir)'
      )
  finally:
    reader.close()


def _disk_usage(path: str) -> int:
  """Bytes a directory takes on its disk (allocated blocks, as du counts them)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        st = os.lstat(os.path.join(root, name))
        total += max(st.st_size, getattr(st, 'st_blocks', 0) * 512)
      except OSError:
        pass
  return total


def reason(e: BaseException) -> str:
  first_line = str(e).splitlines()[0] if str(e) else ''
  return f'{type(e).__name__}: {first_line}'[:240]


def _warn(message: str) -> None:
  """One `warning: ...` line on stderr (the CLI's convention, seen at its default verbosity) and in the log."""
  logging.info('%s', message)
  print(f'warning: {message}', file=sys.stderr, flush=True)


def abstract_with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def tree_nbytes(tree) -> int:
  """Bytes of the array data of a (global) tree: what a checkpoint of it takes at least."""
  return int(
    sum(
      int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
      for x in jax.tree.leaves(tree)
      if hasattr(x, 'shape') and hasattr(x, 'dtype')
    )
  )


def tree_all_finite(tree) -> bool:
  """True when no floating-point leaf holds NaN or inf (one small reduction on the devices)."""
  return bool(jax.device_get(_all_finite(tree)))


def average_trees(trees: list) -> Any:
  """Element-wise mean, accumulated in float64 on the host, then cast back to each leaf's dtype.

  float64 holds the sum of a few float32 values exactly unless their magnitudes differ by more than ~2^26, so the
  result is the mean rounded once to the leaf's dtype, whatever the order of `trees`.
  """
  if not trees:
    raise ValueError('nothing to average')
  total = jax.tree.map(lambda x: np.asarray(x, dtype=np.float64), trees[0])
  for t in trees[1:]:
    total = jax.tree.map(lambda a, x: a + np.asarray(x, dtype=np.float64), total, t)
  return jax.tree.map(lambda a, x: (a / len(trees)).astype(np.asarray(x).dtype), total, trees[0])
