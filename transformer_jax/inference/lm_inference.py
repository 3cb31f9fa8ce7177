"""`transformer-jax generate` and `transformer-jax evaluate` on a decoder-only language model's workdir.

The sampling itself is generate.py; this file opens the workdir (workdir.py: parameters only) and scores the held-out
documents with the trainer's own eval step.
"""

from __future__ import annotations

import json
import sys

import jax
from flax import linen as nn

from transformer_jax.inference import evaluation
from transformer_jax.inference import generate
from transformer_jax.inference import translate as inference
from transformer_jax import parallel
from transformer_jax.inference import scores
from transformer_jax.data import lm
from transformer_jax.model.transformer import build_model
from transformer_jax.inference.workdir import Workdir


# ---------------------------------------------------------------------------------------------------------------------
# The CLI command


def run(FLAGS) -> None:
  prompts = [FLAGS.prompt.replace('\\n', '\n')] if FLAGS.prompt is not None else sys.stdin.read().splitlines()
  loaded = inference.load_workdir(
    FLAGS.workdir,
    FLAGS.config,
    quantize=FLAGS.quantize,
    weights_dtype=FLAGS.weights_dtype,
    kv_cache_dtype=FLAGS.kv_cache_dtype,
  )
  if loaded.cfg.kind != 'decoder':
    raise ValueError(f'{FLAGS.workdir} holds a translation model; generate needs model.kind=decoder (use translate)')
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    completions = generate.generate_texts(
      loaded.params,
      loaded.cfg,
      loaded.tokenizer,
      prompts,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      seed=FLAGS.seed,
    )
  for prompt, completion in zip(prompts, completions):
    if FLAGS.jsonl:
      sys.stdout.write(json.dumps({'prompt': prompt, 'completion': completion}) + '\n')
    else:
      sys.stdout.write(prompt + completion + '\n')
  sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------------------
# `transformer-jax evaluate` on a language-model workdir


def is_language_model_workdir(workdir: str, config=None) -> bool:
  if config is None:
    run = Workdir(workdir)
    if not run.steps():
      return False
    config = run.stored_config()
  return config.model.get('kind', 'encoder_decoder') == 'decoder'


def evaluate_workdir(
  workdir: str, config=None, split: str | None = None, *, quantize: str = 'none', weights_dtype: str = 'float32'
) -> dict[str, float]:
  """Held-out per-token NLL, accuracy, perplexity and bits per byte of the newest checkpoint (every document of the
  split, chunked and packed as in training), with the weights quantize / weights_dtype give
  (quantize.decoding_params)."""
  loaded = inference.load_workdir(workdir, config, quantize=quantize, weights_dtype=weights_dtype)
  config = loaded.config
  docs = lm.load_documents(config, split or config.eval_split)
  if not docs:
    raise ValueError(f'{config.dataset} split {split or config.eval_split!r} has no documents')
  chunks = lm.tokenize_documents(loaded.tokenizer, docs, int(config.max_length))
  data = lm.LMDatasets(
    tokenizer=loaded.tokenizer,
    train=None,
    eval_rows=lm.pack_chunks(chunks, int(config.max_length)),
    eval_tokens=sum(len(c) for c in chunks),
    eval_bytes=sum(len(d.encode('utf-8')) for d in docs),
    eval_documents=docs,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  batches = data.eval_batches(batch_size=int(config.batch_size) // jax.process_count())
  batches = data.eval_batches(
    batch_size=int(config.batch_size) // jax.process_count(), num_batches=parallel.max_over_processes(len(batches))
  )
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    eval_step = jax.jit(evaluation.make_eval_step(build_model(loaded.cfg), config))
    results = evaluation.evaluate_loss(eval_step, loaded.params, batches, loaded.mesh)
  results.update(scores.lm_metrics(results['eval_nll'], data.eval_tokens, data.eval_bytes))
  return results
