"""A long-context language model: 8,192 tokens per row over the standard library (configs/lm_tiny.py's data).

Documents are cut into chunks of max_length tokens (data/lm.py), so at 8,192 almost every stdlib file stays whole
(one packed segment); rows pack several files. Attention is blockwise (attention.py: exact, memory linear in the
length) over a causal local window of 512 positions, so a step costs about what 16 rows of 512 tokens do, and
generation keeps a 512-position ring buffer per layer however long it runs. Full attention at this length:
--config.model.attention_window=0 (about twice the step time here). Small on purpose: it trains and samples on the
2-core CPU host in a few minutes; on a TPU use attention='splash' and raise the sizes (max_length 32k-128k, batch).
"""

from configs import lm_tiny


def get_config():
  config = lm_tiny.get_config()
  config.model.update(
    num_layers=2,
    d_model=64,
    num_heads=2,
    d_ff=256,
    positional='sinusoidal',
    attention='blockwise',
    attention_block_size=512,
    attention_window=512,
  )

  config.max_length = 8192  # tokens per row and chunk length: documents up to 8k tokens stay whole
  config.packed_inputs_length = 8192
  config.packed_targets_length = 8192
  config.batch_size = 1

  config.num_train_steps = 200
  config.learning_rate = 0.5  # peak d_model^-0.5 * warmup^-0.5 * 0.5 = 0.0088
  config.warmup_steps = 50
  config.stall_patience_steps = 0  # off: 200 steps are all warm-up and early descent
  config.log_every_steps = 20
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 1
  config.lm_sample_tokens = 32
  return config
