"""Transformer (base) of Table 3 on WMT14 en->de through TFDS: N=6, d_model 512, d_ff 2048, h 8, P_drop 0.1."""

from configs import tiny


def get_config():
  config = tiny.get_config()
  config.dataset = 'tfds:wmt14_translate/de-en'
  config.source_lang = 'en'
  config.target_lang = 'de'
  config.train_split = 'train'
  config.eval_split = 'validation'
  config.max_eval_examples = 3000
  config.bleu_tokenize = '13a'  # sacrebleu's WMT standard, cased, on detokenized output vs raw references

  config.model.update(vocab_size=37000, num_layers=6, d_model=512, num_heads=8, d_ff=2048, dropout_rate=0.1)
  # bfloat16 compute where the matrix units run it at full rate (TPU, GPU), float32 on CPU, where bfloat16 matmuls
  # are slow; parameters and Adam's moments stay float32 either way.
  config.model.dtype = 'auto'
  config.max_length = 256
  config.packed_inputs_length = 256
  config.packed_targets_length = 256
  config.batch_size = 128  # ~25k source + 25k target tokens per step, as in section 5.1
  config.tokenizer_train_sentences = 1_000_000

  config.num_train_steps = 100_000
  config.learning_rate = 1.0
  config.warmup_steps = 4000
  config.cooldown_fraction = 0.0  # the paper's rsqrt decay to the end (tiny's cooldown is the default job's tuning)
  config.label_smoothing = 0.1

  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.eval_translate_examples = 3000
  config.eval_translate_batch_size = 128
  config.checkpoint_every_steps = 2000
  config.keep_checkpoints = 20  # the paper averages the last 5 (base) / 20 (big)
  return config
