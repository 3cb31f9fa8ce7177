"""Held-out metrics: sacrebleu BLEU and chrF on detokenized text against the RAW references (cased), exact match.

BLEU is sacrebleu's default 13a tokenization of our detokenized output against the untouched reference text,
never against SentencePiece round-trips of the references.
"""

from __future__ import annotations

import math

import numpy as np
import sacrebleu


def text_metrics(hypotheses: list[str], references: list[str], bleu_tokenize: str = '13a') -> dict[str, float]:
  """bleu_tokenize is sacrebleu's: '13a' (WMT standard); 'char' for one-word targets such as German number
  compounds, where word 4-gram BLEU is 0 for any output that is not exact."""
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses for {len(references)} references')
  if not references:
    return {}
  return {
    'bleu': sacrebleu.corpus_bleu(hypotheses, [references], tokenize=bleu_tokenize).score,
    'chrf': sacrebleu.corpus_chrf(hypotheses, [references]).score,
    'exact_match': 100.0 * float(np.mean([h.strip() == r.strip() for h, r in zip(hypotheses, references)])),
  }


def encode_sources(tokenizer, sources: list[str], max_length: int) -> np.ndarray:
  """Sentences -> [N, max_length] ids with EOS; longer inputs are truncated (EOS kept last).

  The pad and eos ids are the tokenizer's own (`tokenizer.special_ids`)."""
  special = tokenizer.special_ids
  rows = np.full((len(sources), max_length), special.pad, np.int32)
  for i, ids in enumerate(tokenizer.encode_batch(list(sources))):
    ids = list(ids)[: max_length - 1] + [special.eos]
    rows[i, : len(ids)] = ids
  return rows


def decode_outputs(tokenizer, tokens: np.ndarray) -> list[str]:
  return [tokenizer.decode([int(t) for t in row]) for row in np.asarray(tokens)]


def lm_metrics(eval_nll: float, eval_tokens: int, eval_bytes: int) -> dict[str, float]:
  """A language model's perplexity per token and bits per byte (so models with other tokenizers compare), from
  the mean held-out NLL (nats per token) over eval_tokens tokens of eval_bytes UTF-8 bytes."""
  return {
    'perplexity': float(math.exp(min(eval_nll, 700.0))),
    'bits_per_byte': float(eval_nll * eval_tokens / max(eval_bytes, 1) / math.log(2)),
  }
