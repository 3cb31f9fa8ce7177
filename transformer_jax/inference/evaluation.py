"""Held-out evaluation: the loss sums every step shares, the eval step, held-out loss over batches, translations of
source ids, and the Evaluator a training run calls between steps (loss; then BLEU / chrF / exact match, or an LM's
bits per byte and samples).

Read-only tools (translate, evaluate, attention maps, the TPU compile check) import this module, not the trainer.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax.inference import decode as decode_lib
from transformer_jax.inference import generate
from transformer_jax import parallel
from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths
from transformer_jax.inference import scores
from transformer_jax.model.transformer import LanguageModel, ModelConfig, Transformer


def cross_entropy_sums(logits, targets, weights, label_smoothing: float) -> dict[str, jax.Array]:
  """Sums over real tokens (weights = non-pad): label-smoothed loss, plain NLL, correct predictions, token count.

  The smoothed target q = (1 - ls) one_hot + ls / V (optax.smooth_labels) gives, in closed form,
  -sum_v q_v log p_v = (1 - ls) nll + ls (logsumexp(z) - mean_v z_v): no dense [tokens, V] one-hot or smoothed
  tensor (on CPU they would be a large share of the base model's step time). `correct` counts z_target >= max_v z.

  Logits may be bfloat16: they are read in float32 inside the reductions. Every [tokens, V] term is a reduction
  over V of an elementwise function of z (the target's logit too: a select against an iota, not a gather whose
  gradient would scatter into a zero [tokens, V] array), so XLA reads z in one or two fused passes, the backward
  pass is one elementwise fusion, and under vocabulary sharding each shard reduces its own slice.
  """
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  is_target = jnp.arange(z.shape[-1], dtype=jnp.int32) == targets[..., None]
  target_logit = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1)
  nll = lse - target_logit
  loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - jnp.mean(z, axis=-1)) if label_smoothing else nll
  correct = target_logit >= jnp.max(z, axis=-1)
  real = weights > 0  # where, not multiply: a non-finite value in a padding slot must not reach the sums
  return {
    'loss_sum': jnp.sum(jnp.where(real, loss * weights, 0.0)),
    'nll_sum': jnp.sum(jnp.where(real, nll * weights, 0.0)),
    'correct_sum': jnp.sum(jnp.where(real, correct * weights, 0.0)),
    'weight_sum': jnp.sum(weights),
  }


def apply_model(model, params, batch, *, deterministic: bool, rngs=None):
  if isinstance(model, LanguageModel):  # next-token targets only: documents packed in `targets`
    return model.apply(
      {'params': params},
      batch['targets'],
      batch.get('targets_segmentation'),
      batch.get('targets_position'),
      deterministic=deterministic,
      rngs=rngs,
    )
  return model.apply(
    {'params': params},
    batch['inputs'],
    batch['targets'],
    batch.get('inputs_segmentation'),
    batch.get('targets_segmentation'),
    batch.get('inputs_position'),
    batch.get('targets_position'),
    deterministic=deterministic,
    rngs=rngs,
  )


def target_weights(batch, pad_id: int):
  # Packed rows pad with 0, which is a real token (EOS) in a Marian vocabulary: the segmentation says what is real.
  if batch.get('targets_segmentation') is not None:
    return (batch['targets_segmentation'] > 0).astype(jnp.float32)
  return (batch['targets'] != pad_id).astype(jnp.float32)


def make_eval_step(model: Transformer, config):
  label_smoothing = float(config.label_smoothing)

  def eval_step(params, batch):
    logits = apply_model(model, params, batch, deterministic=True)
    return cross_entropy_sums(
      logits, batch['targets'], target_weights(batch, model.cfg.special_ids.pad), label_smoothing
    )

  return eval_step


def translate_ids(
  params,
  source_rows: np.ndarray,
  *,
  cfg: ModelConfig,
  mesh,
  batch_size: int,
  max_decode_len: int,
  progress: bool = False,
  beam_size: int = 1,
  alpha: float = 0.6,
  penalty: str = 'gnmt',
):
  """Translations of [N, S] source ids in batches (padded to batch_size, sharded over the batch axes): greedy, or
  beam search with beam_size > 1 and length penalty alpha.

  Every process passes the same rows and gets every translation back.
  """
  from tqdm import tqdm

  outputs = []
  sharding = parallel.batch_sharding(mesh)
  starts = range(0, len(source_rows), batch_size)
  for start in tqdm(starts, disable=not progress or jax.process_index() != 0, unit='batch', desc='translating'):
    chunk = source_rows[start : start + batch_size]
    padded = np.full((batch_size,) + chunk.shape[1:], cfg.special_ids.pad, np.int32)  # batch-padding rows: all PAD
    padded[: len(chunk)] = chunk
    inputs = jax.make_array_from_callback(padded.shape, sharding, lambda idx, p=padded: p[idx])
    if beam_size > 1:
      tokens, _ = decode_lib.beam_search(
        params, inputs, cfg=cfg, beam_size=beam_size, alpha=alpha, penalty=penalty, max_decode_len=max_decode_len
      )
    else:
      tokens = decode_lib.greedy_decode(params, inputs, cfg=cfg, max_decode_len=max_decode_len)
    outputs.append(np.asarray(multihost_utils.process_allgather(tokens, tiled=True))[: len(chunk)])
  return np.concatenate(outputs) if outputs else np.zeros((0, max_decode_len), np.int32)


def evaluate_loss(eval_step, params, batches, mesh) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in batches:
    sums = eval_step(params, parallel.global_batch(batch, mesh))
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  denom = max(totals.get('weight_sum', 0.0), 1.0)
  return {
    'eval_loss': totals.get('loss_sum', 0.0) / denom,
    'eval_nll': totals.get('nll_sum', 0.0) / denom,
    'eval_accuracy': totals.get('correct_sum', 0.0) / denom,
  }


class Evaluator:
  """Held-out loss (a language model: perplexity, bits per byte, samples), then greedy translations of the first
  eval_translate_examples held-out sources scored against their references (BLEU, chrF, exact match)."""

  def __init__(self, config, workdir: str | layout_lib.WorkdirLayout, mesh, cfg: ModelConfig, model, data):
    from transformer_jax.data import pipeline

    self.config, self.mesh, self.cfg, self.data = config, mesh, cfg, data
    self.workdir = layout_lib.of(workdir)
    self.is_chief = jax.process_index() == 0
    self.eval_step = jax.jit(make_eval_step(model, config))
    lengths = dict(
      batch_size=config.batch_size // jax.process_count(),
      inputs_length=config.packed_inputs_length,
      targets_length=config.packed_targets_length,
    )
    self.is_lm = cfg.kind == 'decoder'
    make_batches = data.eval_batches if self.is_lm else functools.partial(pipeline.eval_batches, data.eval_ids)
    self.batches = make_batches(**lengths)
    self.num_batches = parallel.max_over_processes(len(self.batches))  # every process runs the same eval steps
    if len(self.batches) < self.num_batches:
      self.batches = make_batches(num_batches=self.num_batches, **lengths)
    # BLEU: translate_ids wants the same rows on every process, but each holds every process_count-th held-out
    # pair: gather them all (original order), so every process translates and scores the same set.
    eval_pairs = parallel.gather_process_shards(data.eval_pairs)
    self.num_bleu = min(len(eval_pairs), int(config.get('eval_translate_examples', 1000)))
    self.sources = scores.encode_sources(data.tokenizer, [s for s, _ in eval_pairs[: self.num_bleu]], config.max_length)
    self.references = [t for _, t in eval_pairs[: self.num_bleu]]

  def __call__(self, params, step: int, write: bool = True) -> dict[str, float]:
    from tqdm import tqdm

    config = self.config
    if self.is_chief:  # stderr, with the bars: stdout keeps the metrics lines
      tqdm.write(
        f'evaluating step {step}: held-out loss over {self.num_batches} batches'
        + (f', then greedy decoding of {self.num_bleu} sentences' if self.num_bleu else ''),
        file=sys.stderr,
      )
    results = evaluate_loss(self.eval_step, params, self.batches, self.mesh)
    if self.is_lm:
      results.update(scores.lm_metrics(results['eval_nll'], self.data.eval_tokens, self.data.eval_bytes))
      self._samples(params, step)
    if self.num_bleu:
      tokens = translate_ids(
        params,
        self.sources,
        cfg=self.cfg,
        mesh=self.mesh,
        batch_size=int(config.get('eval_translate_batch_size', 256)),
        max_decode_len=config.max_length,
        progress=self.is_chief,
      )
      hypotheses = scores.decode_outputs(self.data.tokenizer, tokens)
      results.update(scores.text_metrics(hypotheses, self.references, config.get('bleu_tokenize', '13a')))
      if self.is_chief and write:
        paths.write_text_atomic(self.workdir.eval_hypotheses(step), '\n'.join(hypotheses) + '\n')
    return results

  def _samples(self, params, step: int) -> None:
    """A language model's samples of config.lm_sample_prompts, in the run's output."""
    from tqdm import tqdm

    prompts = list(self.config.get('lm_sample_prompts', ()))
    if not prompts:
      return
    texts = generate.generate_texts(
      params,
      self.cfg,
      self.data.tokenizer,
      prompts,
      max_new_tokens=int(self.config.get('lm_sample_tokens', 64)),
      temperature=0.8,
      top_p=0.95,
      seed=step,
    )
    if self.is_chief:
      for prompt, text in zip(prompts, texts):
        tqdm.write(f'sample step={step} (temperature 0.8, top_p 0.95):\n{prompt}{text}\n' + '-' * 40)
