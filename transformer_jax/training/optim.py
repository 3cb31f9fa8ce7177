"""Optax optimizer and the paper's learning-rate schedule (section 5.3)."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def paper_schedule(d_model: int, warmup_steps: int, scale: float = 1.0):
  """lrate = scale * d_model^-0.5 * min(step^-0.5, step * warmup_steps^-1.5), with step counted from 1."""

  def schedule(count):
    step = jnp.maximum(jnp.asarray(count, jnp.float32) + 1.0, 1.0)  # optax counts from 0; the paper from 1
    return scale * d_model**-0.5 * jnp.minimum(step**-0.5, step * warmup_steps**-1.5)

  return schedule


def with_cooldown(schedule, num_steps: int, cooldown_steps: int):
  """schedule times a linear ramp from 1 to 0 over the last cooldown_steps of num_steps (big_vision's rsqrt schedule
  with a cooldown): the noise of a high learning rate is annealed away at the end instead of by many more steps."""

  def cooled(count):
    left = jnp.asarray(num_steps, jnp.float32) - jnp.asarray(count, jnp.float32)
    return schedule(count) * jnp.clip(left / cooldown_steps, 0.0, 1.0)

  return cooled


def make_schedule(config):
  if config.lr_schedule == 'rsqrt':
    schedule = paper_schedule(config.model.d_model, config.warmup_steps, config.learning_rate)
  elif config.lr_schedule == 'constant':
    schedule = optax.constant_schedule(config.learning_rate)
  else:
    raise ValueError(f"lr_schedule must be 'rsqrt' (the paper's) or 'constant', got {config.lr_schedule!r}")
  # A fraction, not a step count, so that a short run of a config (tests, smoke runs) keeps its shape.
  cooldown = round(float(config.get('cooldown_fraction', 0.0) or 0.0) * int(config.num_train_steps))
  return with_cooldown(schedule, int(config.num_train_steps), cooldown) if cooldown >= 1 else schedule


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam(beta1, beta2, eps) on the schedule, with optional global-norm clipping.

  Gradient accumulation lives in the train step (a scan over micro-batches), so one optimizer update is one step.
  """
  chain = []
  if config.get('grad_clip_norm', 0.0):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adam(make_schedule(config), b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps))
  return optax.chain(*chain)
