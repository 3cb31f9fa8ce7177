"""Transformer (big) of Table 3: N=6, d_model 1024, d_ff 4096, h 16, P_drop 0.3, 300k steps."""

from configs import base


def get_config():
  config = base.get_config()
  config.model.update(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
  config.num_train_steps = 300_000
  return config
