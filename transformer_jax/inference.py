"""Loading a trained workdir for inference, and the evaluate / translate commands built on it."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import linen as nn

from transformer_jax import checkpoint as checkpoint_lib
from transformer_jax import evaluate as evaluate_lib
from transformer_jax import optim
from transformer_jax import parallel
from transformer_jax import train as train_lib
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.model import ModelConfig, Transformer


@dataclasses.dataclass
class Loaded:
  config: ml_collections.ConfigDict
  cfg: ModelConfig
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  mesh: Any
  step: int


def load_workdir(workdir: str, config=None) -> Loaded:
  """Newest good checkpoint of workdir, onto this machine's mesh; config from the checkpoint unless given."""
  checkpointer = checkpoint_lib.Checkpointer(workdir, read_only=True)
  if checkpointer.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first')
  if config is None:
    config = ml_collections.ConfigDict(checkpointer.restore_config())
  tokenizer_path = os.path.join(workdir, 'spm.model')
  if not os.path.exists(tokenizer_path):
    raise FileNotFoundError(f'no tokenizer at {tokenizer_path}')
  tokenizer = tokenizer_lib.Tokenizer.load(tokenizer_path)
  mesh = parallel.make_mesh(config.mesh)
  cfg = train_lib.model_config(config)
  model = Transformer(cfg)
  tx = optim.make_optimizer(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(train_lib.state_logical_specs(model, tx, config), mesh)
    state, _, step = checkpointer.restore(train_lib.abstract_state(model, tx, config, shardings))
  checkpointer.close()
  return Loaded(config=config, cfg=cfg, params=state.params, tokenizer=tokenizer, mesh=mesh, step=step)


def translate_sentences(loaded: Loaded, sentences: list[str], *, beam_size: int = 1, alpha: float = 0.6,
                        batch_size: int = 64, progress: bool = False) -> list[str]:
  """One translation per sentence, in order; empty sentences give empty translations."""
  if beam_size != 1:
    raise NotImplementedError('beam search is not implemented yet: use --beam_size=1')
  config = loaded.config
  keep = [i for i, s in enumerate(sentences) if s.strip()]
  out = [''] * len(sentences)
  if not keep:
    return out
  rows = evaluate_lib.encode_sources(loaded.tokenizer, [sentences[i] for i in keep], config.max_length)
  batch_size = max(batch_size - batch_size % _batch_divisor(loaded.mesh), _batch_divisor(loaded.mesh))
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    tokens = train_lib.translate_ids(loaded.params, rows, cfg=loaded.cfg, mesh=loaded.mesh, batch_size=batch_size,
                                     max_decode_len=config.max_length, progress=progress)
  for i, text in zip(keep, evaluate_lib.decode_outputs(loaded.tokenizer, tokens)):
    out[i] = text
  return out


def _batch_divisor(mesh) -> int:
  return mesh.shape['data'] * mesh.shape['fsdp']


def translate_workdir(workdir: str, config, sentences: list[str], **kwargs) -> list[str]:
  return translate_sentences(load_workdir(workdir, config), sentences, **kwargs)


def evaluate_workdir(workdir: str, config, *, split: str | None = None, **kwargs) -> dict[str, float]:
  """BLEU / chrF / exact match of the newest checkpoint on a held-out split; hypotheses written beside it."""
  from transformer_jax.data import sources  # pylint: disable=g-import-not-at-top
  loaded = load_workdir(workdir, config)
  config = loaded.config
  split = split or config.eval_split
  pairs = sources.load_text_pairs(config.dataset, split, source_lang=config.source_lang,
                                  target_lang=config.target_lang, data_dir=config.get('data_dir'),
                                  max_examples=config.get('max_eval_examples'),
                                  cache_dir=workdir if config.dataset.startswith('generated:') else None)
  hypotheses = translate_sentences(loaded, [s for s, _ in pairs], **kwargs)
  results = evaluate_lib.text_metrics(hypotheses, [t for _, t in pairs])
  if jax.process_index() == 0:
    path = os.path.join(workdir, f'hypotheses_{split}_step{loaded.step}.txt')
    with open(path, 'w') as f:
      f.write('\n'.join(hypotheses) + '\n')
  return results


def as_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
