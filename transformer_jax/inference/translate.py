"""translate / evaluate over a trained workdir (opened through workdir.py: parameters only)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import linen as nn

from transformer_jax.inference import decode as decode_lib
from transformer_jax.inference import evaluation
from transformer_jax import parallel
from transformer_jax.model import quantize as quantize_lib
from transformer_jax.inference import scores
from transformer_jax.data import sources
from transformer_jax.storage import layout as layout_lib
from transformer_jax.model.config import KV_CACHE_DTYPES
from transformer_jax.inference.workdir import Trained, Workdir


def load_workdir(
  workdir: str | layout_lib.WorkdirLayout,
  config=None,
  *,
  quantize: str = 'none',
  weights_dtype: str = 'float32',
  kv_cache_dtype: str = 'auto',
) -> Trained:
  """Newest good checkpoint of workdir (parameters only), onto this machine's mesh; config from the checkpoint
  unless given. quantize / weights_dtype: the weights decoding runs with (quantize.decoding_params);
  kv_cache_dtype: the decode cache's (model.kv_cache_dtype)."""
  loaded = Workdir(workdir).load(config)
  loaded.params = quantize_lib.decoding_params(loaded.params, quantize, weights_dtype)
  if kv_cache_dtype not in KV_CACHE_DTYPES:
    raise ValueError(f'kv_cache_dtype={kv_cache_dtype!r}: expected one of {", ".join(KV_CACHE_DTYPES)}')
  loaded.cfg = dataclasses.replace(loaded.cfg, kv_cache_dtype=kv_cache_dtype)
  return loaded


def weights_suffix(quantize: str = 'none', weights_dtype: str = 'float32', kv_cache_dtype: str = 'auto') -> str:
  """'' for the trained float32 weights, else e.g. '_int8_bfloat16' (and '_kv_int8' for an int8 decode cache):
  output files of other weights stay apart."""
  kv = f'_kv_{kv_cache_dtype}' if kv_cache_dtype != 'auto' else ''
  return ''.join(f'_{v}' for v in (quantize, weights_dtype) if v not in ('none', 'float32')) + kv


def decode_length(loaded: Trained, longest_source: int) -> int:
  """Cache size for sources of up to longest_source tokens: the paper's input length + 50, capped at the longest
  sequence the model was trained for (config max_length, also within the model's positions)."""
  return max(1, min(int(loaded.config.max_length), loaded.cfg.max_len, longest_source + decode_lib.MAX_LENGTH_MARGIN))


def translate_sentences(
  loaded: Trained,
  sentences: list[str],
  *,
  beam_size: int = 4,
  alpha: float = 0.6,
  batch_size: int = 64,
  progress: bool = False,
  length_penalty: str = 'gnmt',
) -> list[str]:
  """One translation per sentence, in order: greedy (beam_size=1) or beam search with GNMT length penalty alpha.

  Empty (or blank) sentences give empty translations; sentences longer than config max_length tokens are
  truncated; characters outside the vocabulary become <unk>. Each output is at most its source length + 50
  tokens (capped at max_length). Sentences are decoded longest first, so a batch stops when its longest ends.
  """
  if beam_size < 1:
    raise ValueError(f'beam_size must be >= 1, got {beam_size}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  config = loaded.config
  keep = [i for i, s in enumerate(sentences) if s.strip()]
  out = [''] * len(sentences)
  if not keep:
    return out
  rows = scores.encode_sources(loaded.tokenizer, [sentences[i] for i in keep], config.max_length)
  lengths = np.sum(rows != loaded.tokenizer.special_ids.pad, axis=1)
  order = np.argsort(-lengths, kind='stable')
  rows = rows[order, : int(lengths.max())]  # no all-PAD columns: the encoder runs over real lengths only
  divisor = _batch_divisor(loaded.mesh)
  batch_size = min(batch_size, len(rows))
  batch_size = -(-batch_size // divisor) * divisor  # a multiple of the devices on the batch axes
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    tokens = evaluation.translate_ids(
      loaded.params,
      rows,
      cfg=loaded.cfg,
      mesh=loaded.mesh,
      batch_size=batch_size,
      max_decode_len=decode_length(loaded, int(lengths.max())),
      progress=progress,
      beam_size=beam_size,
      alpha=alpha,
      penalty=length_penalty,
    )
  for j, text in zip(order, scores.decode_outputs(loaded.tokenizer, tokens)):
    out[keep[j]] = text
  return out


def _batch_divisor(mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def translate_workdir(
  workdir: str,
  config,
  sentences: list[str],
  *,
  quantize: str = 'none',
  weights_dtype: str = 'float32',
  kv_cache_dtype: str = 'auto',
  **kwargs,
) -> list[str]:
  loaded = load_workdir(workdir, config, quantize=quantize, weights_dtype=weights_dtype, kv_cache_dtype=kv_cache_dtype)
  return translate_sentences(loaded, sentences, **kwargs)


def evaluate_workdir(
  workdir: str | layout_lib.WorkdirLayout,
  config,
  *,
  split: str | None = None,
  beam_size: int = 4,
  alpha: float = 0.6,
  quantize: str = 'none',
  weights_dtype: str = 'float32',
  kv_cache_dtype: str = 'auto',
  **kwargs,
) -> dict[str, float]:
  """BLEU / chrF / exact match of the newest checkpoint on a held-out split (sacrebleu, cased, on the raw
  references), with beam search (keys bleu, chrf, exact_match) and, when beam_size > 1, greedy decoding too
  (keys bleu_greedy, ...). Hypotheses are written beside the checkpoints: WORKDIR/hypotheses_<split>_step<N>.txt
  (beam) and ..._greedy.txt (other weights than the trained float32 ones: ..._step<N>_int8.txt etc.)."""
  workdir = layout_lib.of(workdir)
  loaded = load_workdir(workdir, config, quantize=quantize, weights_dtype=weights_dtype, kv_cache_dtype=kv_cache_dtype)
  config = loaded.config
  split = split or config.eval_split
  pairs = sources.load_text_pairs(
    config.dataset,
    split,
    source_lang=config.source_lang,
    target_lang=config.target_lang,
    data_dir=config.get('data_dir'),
    max_examples=config.get('max_eval_examples'),
    cache_dir=workdir.generated_data if config.dataset.startswith('generated:') else None,
  )
  sources_, references = [s for s, _ in pairs], [t for _, t in pairs]
  weights = weights_suffix(quantize, weights_dtype, kv_cache_dtype)
  runs = [('', beam_size)] + ([('_greedy', 1)] if beam_size > 1 else [])
  results = {}
  for suffix, beams in runs:
    hypotheses = translate_sentences(loaded, sources_, beam_size=beams, alpha=alpha, **kwargs)
    results.update(
      {
        f'{k}{suffix}': v
        for k, v in scores.text_metrics(hypotheses, references, config.get('bleu_tokenize', '13a')).items()
      }
    )
    if jax.process_index() == 0:
      from transformer_jax.storage import paths

      paths.write_text_atomic(
        workdir.hypotheses(split, loaded.step, f'{weights}{suffix}'), '\n'.join(hypotheses) + '\n'
      )
  return results


def as_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
