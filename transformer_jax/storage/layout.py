"""A workdir's file layout: the one place that names the files and folders in WORKDIR.

WORKDIR/
  spm.model                        the SentencePiece tokenizer (its special ids are the vocabulary's: model/vocab.py)
  marian/                          an imported Marian model's vocabulary, used instead of spm.model (data/marian_vocab.py)
  checkpoints/<step>/              Orbax checkpoints: state, data position, config (training/checkpoint.py)
  checkpoints_damaged/<step>/      checkpoints moved aside after a failed restore
  data/                            prepared token-id shards (a gs:// workdir prepares into a local cache instead)
  metrics.jsonl                    one metrics row per line; on gs:// numbered parts metrics/<part>.jsonl (no append)
  tensorboard/                     TensorBoard scalars
  curves.png                       training loss and held-out metrics against step
  eval_hypotheses_<step>.txt       the trainer's greedy translations of the held-out sentences
  hypotheses_<split>_step<step><suffix>.txt   `evaluate`'s translations
  profile/                         jax profiler traces of config.profile_steps
  averaged.json                    what `average` averaged (in its --out workdir)
  .lock                            the writer's lock (storage/lock.py)
  <generated task>-v<n>-....tsv    a generated dataset's text, cached beside the run (data/sources.py)

`WorkdirLayout.at(path)` resolves the path (paths.resolve: absolute, or gs://bucket/path) once: a command builds it
at its entry and hands the object down, and every reader and writer takes its paths from it. `of(x)` takes a layout
as it is and resolves a path, for library callers that pass strings.
"""

from __future__ import annotations

import dataclasses
import os

from transformer_jax.storage import paths

TOKENIZER_NAME = 'spm.model'
MARIAN_DIR_NAME = 'marian'
CHECKPOINTS_NAME = 'checkpoints'
DAMAGED_CHECKPOINTS_NAME = 'checkpoints_damaged'
PREPARED_NAME = 'data'
METRICS_NAME = 'metrics.jsonl'
METRICS_PARTS_NAME = 'metrics'
TENSORBOARD_NAME = 'tensorboard'
CURVES_NAME = 'curves.png'
PROFILE_NAME = 'profile'
AVERAGED_NAME = 'averaged.json'
LOCK_NAME = '.lock'


@dataclasses.dataclass(frozen=True)
class WorkdirLayout:
  """Every file and folder of the workdir at `root` (a path as given; `at` resolves it)."""

  root: str

  @classmethod
  def at(cls, path: str) -> WorkdirLayout:
    return cls(paths.resolve(path))

  def _join(self, *parts: str) -> str:
    return paths.join(self.root, *parts)

  @property
  def is_gcs(self) -> bool:
    return paths.is_gcs(self.root)

  @property
  def tokenizer(self) -> str:
    return self._join(TOKENIZER_NAME)

  @property
  def marian_dir(self) -> str:
    return self._join(MARIAN_DIR_NAME)

  @property
  def checkpoints(self) -> str:
    return self._join(CHECKPOINTS_NAME)

  @property
  def damaged_checkpoints(self) -> str:
    return self._join(DAMAGED_CHECKPOINTS_NAME)

  @property
  def prepared(self) -> str:
    """Where the token-id shards go by default: WORKDIR/data, or for a gs:// workdir a local cache directory, because
    the stream memory-maps the shards (an object store has no mmap). A shard directory's name is a key of what the
    shards are made from, so one cache serves every workdir."""
    if not self.is_gcs:
      return self._join(PREPARED_NAME)
    return os.path.join(paths.cache_root(), 'prepared')

  @property
  def generated_data(self) -> str:
    """The folder that caches a generated dataset's text (the workdir itself)."""
    return self.root

  @property
  def metrics(self) -> str:
    return self._join(METRICS_NAME)

  @property
  def metrics_parts(self) -> str:
    return self._join(METRICS_PARTS_NAME)

  def metrics_part(self, name: str) -> str:
    return self._join(METRICS_PARTS_NAME, f'{name}.jsonl')

  @property
  def tensorboard(self) -> str:
    return self._join(TENSORBOARD_NAME)

  @property
  def curves(self) -> str:
    return self._join(CURVES_NAME)

  def eval_hypotheses(self, step: int) -> str:
    return self._join(f'eval_hypotheses_{step}.txt')

  def hypotheses(self, split: str, step: int, suffix: str = '') -> str:
    return self._join(f'hypotheses_{split}_step{step}{suffix}.txt')

  @property
  def profile(self) -> str:
    return self._join(PROFILE_NAME)

  @property
  def averaged(self) -> str:
    return self._join(AVERAGED_NAME)

  @property
  def lock(self) -> str:
    return self._join(LOCK_NAME)


def of(workdir: str | WorkdirLayout) -> WorkdirLayout:
  """workdir's layout: a layout as given, a path resolved (once, here)."""
  return workdir if isinstance(workdir, WorkdirLayout) else WorkdirLayout.at(workdir)
