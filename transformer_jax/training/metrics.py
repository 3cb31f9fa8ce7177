"""The run's metrics: TensorBoard scalars and a JSON-lines copy (metrics.jsonl, or numbered parts on gs://), read
back by read_metrics and drawn by plot_curves into curves.png."""

from __future__ import annotations

import atexit
import io
import json
import os
import shutil
import socket
import tempfile
import time

from absl import logging

from transformer_jax.storage import layout as layout_lib
from transformer_jax.storage import paths

METRICS_PART_ROWS = 200  # rows per part: each write re-uploads only the current part


class TensorBoardEvents:
  """One TensorBoard event file of scalars, written with tensorboard's own record writer and protos: the trainer
  never imports TensorFlow for it (an import that costs seconds of CPU at start-up)."""

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer import record_writer

    self._event_pb2 = event_pb2
    os.makedirs(logdir, exist_ok=True)
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}.transformer_jax'
    self._records = record_writer.RecordWriter(open(os.path.join(logdir, name), 'wb'))
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    if self._records is None:
      return
    try:
      self._records.write(event.SerializeToString())
      self._records.flush()
    except OSError as e:  # a full disk, say: TensorBoard is a convenience copy, metrics.jsonl is the record
      logging.warning('TensorBoard events are no longer written (%s); metrics.jsonl keeps every row', e)
      self._records = None

  def scalars(self, step: int, metrics: dict[str, float]) -> None:
    from tensorboard.compat.proto import summary_pb2

    summary = summary_pb2.Summary(
      value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    )
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))


class MetricsWriter:
  """TensorBoard scalars + a JSON-lines copy (for curves.png and for people without TensorBoard).

  Local workdir: WORKDIR/metrics.jsonl, appended, and TensorBoard events written in WORKDIR/tensorboard.
  gs:// workdir: nothing is appended (GCS has none; gcsfs would silently truncate): each run writes numbered parts
  WORKDIR/metrics/<first step>-<run start>-<part>.jsonl, the current part re-uploaded whole at each write; the
  events are written to a local staging directory (TensorFlow's own gs:// filesystem cannot be pointed at another
  endpoint, and would be a second GCS client) and the event files uploaded whole at each write. read_metrics reads
  both layouts.
  """

  def __init__(self, workdir: str | layout_lib.WorkdirLayout, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.layout = layout_lib.of(workdir)
    self.workdir = self.layout.root
    self.remote = self.layout.is_gcs
    self.path = self.layout.metrics
    self._rows: list[str] = []
    self._part = 0
    self._run = f'{start_step:010d}-{time.strftime("%Y%m%dT%H%M%S", time.gmtime())}-{os.getpid()}'
    if enabled:
      if self.remote:
        self._staging = tempfile.mkdtemp(prefix='transformer_jax_tensorboard_')
        # uploaded at each write, so a local copy is not needed after the run: gone at exit, however it ends
        atexit.register(shutil.rmtree, self._staging, ignore_errors=True)
      self._events = TensorBoardEvents(self._staging if self.remote else self.layout.tensorboard)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._events.scalars(step, metrics)
    line = json.dumps({'step': step, **{k: float(v) for k, v in metrics.items()}}) + '\n'
    if not self.remote:
      with open(self.path, 'a') as f:
        f.write(line)
      return
    if len(self._rows) >= METRICS_PART_ROWS:
      self._rows, self._part = [], self._part + 1
    self._rows.append(line)
    paths.write_text_atomic(self.layout.metrics_part(f'{self._run}-{self._part:05d}'), ''.join(self._rows))
    self._upload_events()

  def _upload_events(self) -> None:
    for name in os.listdir(self._staging):
      paths.upload_file(os.path.join(self._staging, name), paths.join(self.layout.tensorboard, name))


def read_metrics(workdir: str | layout_lib.WorkdirLayout) -> list[dict]:
  """Every metrics row of a workdir in the order written: metrics.jsonl, then the numbered parts (gs://)."""
  texts = []
  layout = layout_lib.of(workdir)
  if paths.exists(layout.metrics):
    texts.append(paths.read_text(layout.metrics))
  parts_dir = layout.metrics_parts
  for name in paths.listdir(parts_dir):
    if name.endswith('.jsonl'):
      texts.append(paths.read_text(paths.join(parts_dir, name)))
  return [json.loads(line) for text in texts for line in text.splitlines() if line.strip()]


def plot_curves(workdir: str | layout_lib.WorkdirLayout, out_path: str) -> None:
  """curves.png (at out_path, local or gs://): training loss and held-out metrics of workdir against step."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  for key, ax in (('loss', ax_loss), ('eval_loss', ax_loss)):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    if pts:
      ax.plot(*zip(*pts), label=key, marker='.' if key.startswith('eval') else None)
  ax_loss.set(xlabel='step', ylabel='label-smoothed cross-entropy', title='loss', yscale='log')
  ax_loss.legend()
  for key in ('bleu', 'chrf', 'exact_match'):
    pts = [(r['step'], r[key]) for r in rows if key in r]
    if pts:
      ax_eval.plot(*zip(*pts), label=key, marker='o')
  ax_eval.set(xlabel='step', ylabel='score (0-100)', title='held-out', ylim=(0, 100))
  if ax_eval.lines:  # a language model has no BLEU
    ax_eval.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=90)
  plt.close(fig)
  paths.write_bytes_atomic(out_path, buffer.getvalue())
