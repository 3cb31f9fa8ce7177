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


def make_schedule(config):
  if config.lr_schedule == 'rsqrt':
    return paper_schedule(config.model.d_model, config.warmup_steps, config.learning_rate)
  if config.lr_schedule == 'constant':
    return optax.constant_schedule(config.learning_rate)
  raise ValueError(f"lr_schedule must be 'rsqrt' (the paper's) or 'constant', got {config.lr_schedule!r}")


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam(beta1, beta2, eps) on the schedule, with optional global-norm clipping.

  Gradient accumulation lives in the train step (a scan over micro-batches), so one optimizer update is one step.
  """
  chain = []
  if config.get('grad_clip_norm', 0.0):
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  chain.append(optax.adam(make_schedule(config), b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps))
  return optax.chain(*chain)
