"""Checks that stop or watch a training run between steps: non-finite values (before anything is saved), a loss that
stopped falling, a profiler trace of chosen steps; and what the run reports of its own speed (tokens/s, the wall and
CPU seconds of each phase)."""

from __future__ import annotations

import math
import os
import sys
import time

import jax
from absl import logging

from transformer_jax.storage import layout as layout_lib
from transformer_jax.training import checkpoint as checkpoint_lib
from transformer_jax import errors


class NonFiniteLossError(errors.UserError, RuntimeError):
  exit_code = errors.FAILED


def stop_if_not_finite(metrics: dict[str, float], step: int, checkpointer, state=None) -> None:
  """NaN/inf loss or gradient norm (or, given `state`, a non-finite parameter or moment: an overflowing update)
  -> stop before anything of this step is saved; the last good checkpoint stays."""
  bad = [f'{k}={metrics[k]}' for k in ('loss', 'grad_norm') if k in metrics and not math.isfinite(metrics[k])]
  if not bad and state is not None and not checkpoint_lib.tree_all_finite(state):
    bad.append('non-finite parameters or optimizer state')
  if bad:
    checkpointer.wait()  # an earlier, good save may still be committing in the background: let it finish
    raise NonFiniteLossError(
      f'{", ".join(bad)} at step {step}; stopping without saving (last good checkpoint: '
      f'step {checkpointer.latest_step()})'
    )


class TrainingStalledError(errors.UserError, RuntimeError):
  exit_code = errors.FAILED


class StallDetector:
  """Fails loudly when the training loss stops falling (post-norm Transformers stall near ln-ish plateaus when the
  peak learning rate is too high): after warmup, if the best smoothed loss has not improved by `min_improvement`
  (relative) within `patience` steps, raise. patience=0 disables it."""

  def __init__(self, patience: int, warmup_steps: int, min_improvement: float = 0.01, smoothing: float = 0.9):
    self.patience, self.warmup_steps, self.min_improvement, self.smoothing = (
      patience,
      warmup_steps,
      min_improvement,
      smoothing,
    )
    self.smoothed = None
    self.best = math.inf
    self.best_step = None

  def update(self, step: int, loss: float) -> None:
    self.smoothed = loss if self.smoothed is None else self.smoothing * self.smoothed + (1 - self.smoothing) * loss
    if not self.patience or step <= self.warmup_steps:
      return
    if self.best_step is None or self.smoothed < self.best * (1 - self.min_improvement):
      self.best, self.best_step = self.smoothed, step
    elif step - self.best_step >= self.patience:
      raise TrainingStalledError(
        f'training loss stopped falling: {self.smoothed:.3f} at step {step}, no better than {self.best:.3f} at step '
        f'{self.best_step}; the peak learning rate may be too high (try a smaller --config.learning_rate) '
        f'(stall_patience_steps={self.patience}; 0 disables this check)'
      )


class Profiler:
  """config.profile_steps='a,b': a jax.profiler trace of the steps that take the step counter from a to b, written
  to WORKDIR/profile (open with TensorBoard's profile plugin, xprof or Perfetto). '' (the default): no trace."""

  def __init__(self, profile_steps: str, workdir: str | layout_lib.WorkdirLayout):
    self.directory = layout_lib.of(workdir).profile
    self.active = False
    self.start_step = self.stop_step = None
    if str(profile_steps or '').strip():
      try:
        self.start_step, self.stop_step = (int(x) for x in str(profile_steps).split(','))
      except ValueError as e:
        raise ValueError(f"profile_steps must be 'a,b' (two step numbers), got {profile_steps!r}") from e
      if not 0 <= self.start_step < self.stop_step:
        raise ValueError(f'profile_steps={profile_steps!r} needs 0 <= a < b')

  def before_step(self, step: int) -> None:
    if step == self.start_step and not self.active:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, state) -> None:
    if self.active and step >= self.stop_step:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info('profile of steps %d..%d in %s', self.start_step, self.stop_step, self.directory)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.stop()


class PhaseClock:
  """Wall and CPU seconds (user + system, this process and its finished children: the number-words workers) of each
  phase of a run, printed to stderr at the end: where a run's time goes, on any machine."""

  def __init__(self):
    self.phases: list[tuple[str, float, float]] = []
    self._wall, self._cpu = time.time(), self._cpu_now()

  @staticmethod
  def _cpu_now() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system

  def mark(self, name: str) -> PhaseClock:
    wall, cpu = time.time(), self._cpu_now()
    self.phases.append((name, wall - self._wall, cpu - self._cpu))
    self._wall, self._cpu = wall, cpu
    return self

  def report(self) -> None:
    print(
      'time: ' + '; '.join(f'{name} {wall:.1f} s (cpu {cpu:.1f} s)' for name, wall, cpu in self.phases),
      file=sys.stderr,
      flush=True,
    )


class Throughput:
  """Target tokens/s over the steps since the last log line: the first (compiling) step and evaluations excluded."""

  def __init__(self):
    self.tokens, self.start = 0.0, time.time()

  def restart(self) -> None:
    self.tokens, self.start = 0.0, time.time()

  def rate(self) -> float:
    rate = self.tokens / max(time.time() - self.start, 1e-9)
    self.restart()
    return rate
