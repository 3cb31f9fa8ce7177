"""The embedded default language model: GPT-2's architecture, small, on the running Python's standard library.

Pre-norm, learned positions, GELU, attention biases, a final LayerNorm, tied embeddings, unscaled embeddings:
every run exports to hf-gpt2 as it is. Text: the interpreter's own stdlib .py files (data/lm.py's 'pystdlib'),
5% of the files (by a hash of their path) held out. Sizes are multiples of 8 so every mesh of 8 devices runs it.
"""

import ml_collections

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.dataset = 'pystdlib'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.eval_percent = 5  # held-out files: sha256(relative path) % 100 < 5
  config.stdlib_dir = ml_collections.config_dict.placeholder(str)  # None: sysconfig.get_paths()['stdlib']
  config.text_feature = 'text'  # for tfds:NAME sources
  config.max_train_documents = ml_collections.config_dict.placeholder(int)
  config.max_eval_documents = ml_collections.config_dict.placeholder(int)
  config.tokenizer_train_sentences = 50_000  # lines, sampled evenly over the training files

  config.model = ml_collections.ConfigDict(
    dict(
      kind='decoder',
      vocab_size=2048,
      num_layers=4,
      d_model=128,
      num_heads=4,
      d_ff=512,
      dropout_rate=0.0,
      share_embeddings=True,
      pre_norm=True,
      positional='learned',
      activation='gelu',
      use_bias=True,
      scale_embeddings=False,
      dtype='float32',
      remat='none',
      scan_layers=False,
      # attention.py: 'auto' | 'dense' | 'cudnn' (GPU) | 'blockwise' | 'splash' (TPU); window 0 = full attention
      attention='dense',
      attention_block_size=512,
      attention_window=0,
      # decoding's self-attention cache: 'auto' (the compute dtype) | 'float32' | 'bfloat16' | 'int8'
      kv_cache_dtype='auto',
    )
  )

  config.max_length = 128  # context: tokens per row; documents are cut into chunks of this many tokens
  config.packed_inputs_length = 128
  config.packed_targets_length = 128
  config.batch_size = 16

  config.num_train_steps = 800
  config.lr_schedule = 'rsqrt'
  config.learning_rate = 1.0  # peak d_model^-0.5 * warmup^-0.5 = 0.0088
  config.warmup_steps = 100
  config.cooldown_fraction = 0.0  # the paper's decay alone; tiny's cooldown is tuned for the default job
  config.label_smoothing = 0.0  # a language model's loss is the plain next-token NLL
  config.stall_patience_steps = 400

  config.log_every_steps = 50
  config.eval_every_steps = 400
  config.eval_translate_examples = 0
  config.lm_sample_prompts = ('def read_config(path', 'class Stack:\n    def ')
  config.lm_sample_tokens = 64
  config.checkpoint_every_steps = 400
  config.keep_checkpoints = 3
  return config
