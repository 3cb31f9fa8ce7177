"""Unigram / bigram baselines (add-one smoothed) in bits per byte on the LM config's own train/held-out split.

Byte level (256 symbols), and token level with the run's SentencePiece model when --workdir has one (nats per
token over the held-out documents, EOS included as the model's loss counts it, / held-out bytes / ln 2), so the
model's bits_per_byte has a floor to compare with.

  python benchmarks/lm_baseline.py --config=configs/lm_tiny.py [--workdir=runs/lm_tiny]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_jax.data import lm


def _bits(train_seqs, eval_seqs, vocab: int) -> tuple[float, float]:
  """(unigram bits, bigram bits) summed over eval_seqs; sequences are int arrays, each starting a new context."""
  uni = np.ones(vocab, np.float64)
  bi = np.ones((vocab + 1, vocab), np.float64)  # row `vocab`: the start of a sequence
  for s in train_seqs:
    np.add.at(uni, s, 1)
    np.add.at(bi, (np.concatenate([[vocab], s[:-1]]), s), 1)
  log_uni = np.log2(uni / uni.sum())
  log_bi = np.log2(bi / bi.sum(axis=1, keepdims=True))
  u = b = 0.0
  for s in eval_seqs:
    u -= log_uni[s].sum()
    b -= log_bi[np.concatenate([[vocab], s[:-1]]), s].sum()
  return u, b


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/lm_tiny.py')
  parser.add_argument('--workdir', default=None)
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('config', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  train = lm.load_documents(config, config.train_split)
  held_out = lm.load_documents(config, config.eval_split)
  num_bytes = sum(len(d.encode('utf-8')) for d in held_out)
  as_bytes = lambda docs: [np.frombuffer(d.encode('utf-8'), np.uint8).astype(np.int64) for d in docs]
  u, b = _bits(as_bytes(train), as_bytes(held_out), 256)
  print(f'{config.dataset}: {len(train)} train / {len(held_out)} held-out documents, {num_bytes} held-out bytes')
  print(f'byte unigram: bits_per_byte={u / num_bytes:.4f}')
  print(f'byte bigram: bits_per_byte={b / num_bytes:.4f}')
  spm_path = os.path.join(args.workdir or '', 'spm.model')
  if args.workdir and os.path.exists(spm_path):
    from transformer_jax.data import tokenizer as tokenizer_lib

    tok = tokenizer_lib.Tokenizer.load(spm_path)
    ids = lambda docs: [np.asarray(i + [1], np.int64) for i in tok.encode_batch(docs)]
    u, b = _bits(ids(train), ids(held_out), tok.vocab_size)
    print(f'token unigram ({tok.vocab_size} pieces): bits_per_byte={u / num_bytes:.4f}')
    print(f'token bigram ({tok.vocab_size} pieces): bits_per_byte={b / num_bytes:.4f}')


if __name__ == '__main__':
  main()
