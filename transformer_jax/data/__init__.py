"""Input pipeline: sources -> sentencepiece -> filter/truncate -> pack -> shuffle -> batch (per process).

Training data is prepared once into token-id shards (prepare.py) and streamed from them (stream.py);
held-out data stays in memory (pipeline.eval_batches).

TensorFlow is imported only where files or TFDS are read (sources.py) and in build_datasets.
"""

from transformer_jax.data.packing import pack_examples, packing_efficiency
from transformer_jax.data.pipeline import Datasets, build_datasets, eval_batches, tokenize_pairs
from transformer_jax.data.sources import load_text_pairs
from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, load_or_train_tokenizer

__all__ = [
  'BOS_ID',
  'EOS_ID',
  'PAD_ID',
  'UNK_ID',
  'Tokenizer',
  'load_or_train_tokenizer',
  'load_text_pairs',
  'pack_examples',
  'packing_efficiency',
  'eval_batches',
  'tokenize_pairs',
  'build_datasets',
  'Datasets',
]
