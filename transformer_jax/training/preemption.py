"""SIGTERM/SIGINT during training: which phase the run is in decides between stopping at once (nothing new to save)
and finishing the current step, saving and stopping (faults.SIGNALS_HELP says the convention to users)."""

from __future__ import annotations

import signal

import jax
from absl import logging


class Preempted(BaseException):
  """Raised by the signal handler where there is nothing left to save. A BaseException, like KeyboardInterrupt, so
  that no `except Exception` on its way (e.g. the damaged-checkpoint fallback of a restore) mistakes it for damage."""


class Preemption:
  """SIGTERM/SIGINT -> exit 0 at any phase of train_and_evaluate (faults.SIGNALS_HELP, in `train --help`).

  phase 'setup' (data, tokenizer, restore) and 'final_eval': the handler raises Preempted (nothing new to save, or
  the final save is already running); 'train' (and 'commit'): it sets a flag and the loop finishes the current
  step, saves and stops.

  Several processes (jax.distributed initialised): JAX's preemption service catches SIGTERM on any host and names
  one step for all (multihost_utils.reached_preemption_sync_point, asked every step), so no Python handler is
  installed there (it would replace JAX's).
  """

  def __init__(self, checkpointer=None):
    self.requested = False
    self.phase = 'setup'
    self.checkpointer = checkpointer
    self._previous = {}
    self._multihost = jax.process_count() > 1

  def should_stop(self, step: int) -> bool:
    return self.checkpointer.reached_preemption(step) if self._multihost else self.requested

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT) if not self._multihost else ():
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. some test runners): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    first = not self.requested
    self.requested = True
    if first and self.phase in ('setup', 'final_eval'):
      raise Preempted(signum)
    logging.warning('received signal %d: saving after this step', signum)

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def stop_preempted(preemption: Preemption) -> dict[str, float]:
  """Waits for any save in flight (the final checkpoint), says where the run stopped, returns the preempted result."""
  checkpointer = preemption.checkpointer
  if checkpointer is not None:
    checkpointer.wait()  # the final checkpoint (or any save in flight) commits before we go
  step = checkpointer.latest_step() if checkpointer is not None else None
  if jax.process_index() == 0:
    if preemption.phase == 'final_eval':
      print(
        f'preempted: during the final evaluation; checkpoint step {step} is committed in '
        f'{checkpointer.directory} (rerun to evaluate it)',
        flush=True,
      )
    else:
      print(
        'preempted: before the first training step; nothing new to save (newest checkpoint: '
        f'{"none" if step is None else f"step {step}"})',
        flush=True,
      )
  if checkpointer is not None:
    checkpointer.close()
  return {'step': step or 0, 'preempted': 1.0}
