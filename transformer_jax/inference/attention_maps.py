"""`transformer-jax attention`: what the model attends to, as one PNG (and raw weights as JSON).

The sentence is translated with the ordinary decoder (greedy or beam search), then (source, translation) goes through
ONE teacher-forced forward pass with ModelConfig.attention_weights=True: the same parameters and masks, an explicit
softmax(QK^T/sqrt(d_k))V that sows every layer's weights into the 'intermediates' collection (model.py). The fused
attention that trains is untouched.

Kinds of attention, each [layers, batch, heads, queries, keys]:
  encoder_self  source x source
  decoder_self  output position x decoder input (<s> then the translation shifted right), causal
  cross         output position x source (row i is the position that predicts target token i)
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from transformer_jax.inference import evaluation
from transformer_jax.inference import translate as inference
from transformer_jax import parallel
from transformer_jax.inference import scores
from transformer_jax.model.transformer import Transformer

KINDS = ('cross', 'encoder_self', 'decoder_self')
_MODULES = {
  'encoder_self': ('encoder', 'self_attention'),
  'decoder_self': ('decoder', 'self_attention'),
  'cross': ('decoder', 'cross_attention'),
}
_TITLES = {'cross': 'cross', 'encoder_self': 'enc self', 'decoder_self': 'dec self'}
_AXES = {
  'cross': ('source', 'output'),
  'encoder_self': ('source', 'source'),
  'decoder_self': ('decoder input', 'output'),
}

DPI = 80
MAX_SENTENCES = 4  # --input lines drawn (the rest are skipped with a note)


# ---------------------------------------------------------------------------------------------------------------------
# Weights out of the model


def attention_weights(
  params,
  cfg,
  inputs,
  targets,
  inputs_segmentation=None,
  targets_segmentation=None,
  inputs_position=None,
  targets_position=None,
):
  """(logits [B, T, V], {kind: [L, B, H, Tq, Tk]}) of one deterministic teacher-forced pass (packed or not).

  Runs the model with cfg.attention_weights=True (explicit attention that sows its weights); works with
  scan_layers (weights stacked by nn.scan) and remat alike.
  """
  model = Transformer(dataclasses.replace(cfg, attention_weights=True, decode=False))
  logits, state = model.apply(
    {'params': params},
    inputs,
    targets,
    inputs_segmentation,
    targets_segmentation,
    inputs_position,
    targets_position,
    deterministic=True,
    mutable=['intermediates'],
  )
  return logits, collect(state['intermediates'], cfg)


def collect(intermediates, cfg) -> dict:
  """{kind: [L, B, H, Tq, Tk]} from the sown 'intermediates' tree (layers_0..N-1, or one scanned 'layers')."""
  out = {}
  for kind, (stack, module) in _MODULES.items():
    tree = intermediates[stack]
    if cfg.scan_layers:
      out[kind] = tree['layers'][module]['attention_weights'][0]
    else:
      out[kind] = jnp.stack([tree[f'layers_{i}'][module]['attention_weights'][0] for i in range(cfg.num_layers)])
  return out


# ---------------------------------------------------------------------------------------------------------------------
# Sentences -> translations -> weights


@dataclasses.dataclass
class SentenceMaps:
  source: str
  translation: str
  source_pieces: list[str]  # source ids, EOS included
  target_pieces: list[str]  # the translation's ids, EOS included: what each decoder position outputs
  decoder_input_pieces: list[str]  # <s> + target_pieces[:-1]
  weights: dict  # kind -> np.ndarray [L, H, Tq, Tk] (real tokens only)


def compute(loaded, sentences: list[str], *, beam_size: int = 1, alpha: float = 0.6) -> list[SentenceMaps]:
  """Translates `sentences` (non-empty), then collects every layer's and head's weights over (source, translation)."""

  if beam_size < 1:
    raise ValueError(f'--beam_size must be >= 1, got {beam_size}')
  config, tokenizer = loaded.config, loaded.tokenizer
  special = tokenizer.special_ids
  sources = scores.encode_sources(tokenizer, sentences, config.max_length)
  source_lengths = np.sum(sources != special.pad, axis=1)
  sources = sources[:, : int(source_lengths.max())]
  divisor = loaded.mesh.shape['data'] * loaded.mesh.shape['fsdp']
  rows = -(-len(sources) // divisor) * divisor  # a multiple of the devices on the batch axes
  sources = np.pad(sources, ((0, rows - len(sources)), (0, 0)))
  with jax.set_mesh(loaded.mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    tokens = evaluation.translate_ids(
      loaded.params,
      sources,
      cfg=loaded.cfg,
      mesh=loaded.mesh,
      batch_size=rows,
      max_decode_len=inference.decode_length(loaded, int(source_lengths.max())),
      beam_size=beam_size,
      alpha=alpha,
    )
    # The decoded ids themselves (up to and with EOS), not a re-tokenisation of the translated text.
    targets_list = []
    for row in np.asarray(tokens):
      ids = [int(t) for t in row if int(t) not in (special.pad, special.bos)]
      ids = ids[: ids.index(special.eos) + 1] if special.eos in ids else ids[: loaded.cfg.max_len - 1] + [special.eos]
      targets_list.append(ids)
    targets_list = targets_list[: len(sentences)]  # the padding rows get empty targets
    targets = np.zeros((rows, max(len(t) for t in targets_list)), np.int32)
    for i, ids in enumerate(targets_list):
      targets[i, : len(ids)] = ids
    cfg = dataclasses.replace(loaded.cfg, dropout_rate=0.0)
    _, weights = jax.jit(lambda p, x, y: attention_weights(p, cfg, x, y))(loaded.params, sources, targets)
    weights = {k: np.asarray(jax.device_get(v), np.float32) for k, v in weights.items()}

  piece = tokenizer.id_to_piece
  size = tokenizer.vocab_size
  name = lambda i: piece(i) if 0 <= i < size else f'<{i}>'
  out = []
  for i, sentence in enumerate(sentences):
    s, t = int(source_lengths[i]), len(targets_list[i])
    target_ids = targets_list[i]
    out.append(
      SentenceMaps(
        source=sentence,
        translation=tokenizer.decode(target_ids),
        source_pieces=[name(int(x)) for x in sources[i, :s]],
        target_pieces=[name(x) for x in target_ids],
        decoder_input_pieces=[name(special.bos)] + [name(x) for x in target_ids[:-1]],
        weights={
          'encoder_self': weights['encoder_self'][:, i, :, :s, :s],
          'decoder_self': weights['decoder_self'][:, i, :, :t, :t],
          'cross': weights['cross'][:, i, :, :t, :s],
        },
      )
    )
  return out


def alignment(maps: SentenceMaps) -> list[tuple[str, str]]:
  """(target piece, the source piece it attends to most): last layer's cross-attention averaged over heads."""
  mean = maps.weights['cross'][-1].mean(axis=0)  # [T, S]
  return [(t, maps.source_pieces[int(j)]) for t, j in zip(maps.target_pieces, mean.argmax(axis=1))]


# ---------------------------------------------------------------------------------------------------------------------
# The picture


def _panel_inches(num_tokens: int) -> float:
  # Room for one readable tick label per token, in 1/16 inch so that inches * DPI is exactly the pixel count.
  return round((1.2 + 0.14 * num_tokens) * 16) / 16


def layout(num_layers: int, num_heads: int, num_sentences: int = 1, max_tokens: int = 1) -> dict:
  """Grid of one figure: per sentence a row of cross-attention averaged over heads (one panel per layer), then one
  row per (kind, layer) with a panel per head; the last narrow column holds each row's colour bar."""
  rows_per_sentence = 1 + len(KINDS) * num_layers
  columns = max(num_layers, num_heads)
  panel = _panel_inches(max_tokens)
  width, height = columns * panel + 1.125, num_sentences * rows_per_sentence * panel  # + labels, colour bars
  return dict(
    rows=num_sentences * rows_per_sentence,
    columns=columns,
    panel=panel,
    size_inches=(width, height),
    size_pixels=(int(width * DPI), int(height * DPI)),
  )


def draw(all_maps: list[SentenceMaps], path: str, *, layers: list[int], heads: list[int], max_tokens: int) -> tuple:
  """One PNG at `path`; layers/heads are 0-based indices. Returns its (width, height) in pixels."""
  import matplotlib

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt

  longest = max(min(max(len(m.source_pieces), len(m.target_pieces)), max_tokens) for m in all_maps)
  grid = layout(len(layers), len(heads), len(all_maps), longest)
  fig = plt.figure(figsize=grid['size_inches'], dpi=DPI)
  spec = fig.add_gridspec(
    grid['rows'],
    grid['columns'] + 1,
    width_ratios=[1] * grid['columns'] + [0.06],
    left=1.0 / grid['size_inches'][0],
    right=0.97,
    bottom=0.02,
    top=0.98,
    wspace=0.5,
    hspace=0.5,
  )
  font = 6
  row = 0
  for number, maps in enumerate(all_maps):
    pieces = {
      'source': maps.source_pieces[:max_tokens],
      'output': maps.target_pieces[:max_tokens],
      'decoder input': maps.decoder_input_pieces[:max_tokens],
    }
    panels = [[('cross', layer, None) for layer in layers]]
    for kind in KINDS:
      panels += [[(kind, layer, head) for head in heads] for layer in layers]
    for panel_row in panels:
      image = None
      for column, (kind, layer, head) in enumerate(panel_row):
        ax = fig.add_subplot(spec[row, column])
        x_name, y_name = _AXES[kind]
        w = maps.weights[kind][layer]
        w = w.mean(axis=0) if head is None else w[head]
        w = w[: len(pieces[y_name]), : len(pieces[x_name])]
        image = ax.imshow(w, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto', interpolation='nearest')
        ax.set_xticks(range(w.shape[1]), pieces[x_name], rotation=90, fontsize=font)
        ax.set_yticks(range(w.shape[0]), pieces[y_name], fontsize=font)
        ax.tick_params(length=1, pad=1)
        who = 'mean of heads' if head is None else f'head {head + 1}'
        prefix = f'#{number + 1} ' if len(all_maps) > 1 else ''
        ax.set_title(f'{prefix}{_TITLES[kind]} L{layer + 1} {who}', fontsize=font + 1, pad=2)
      fig.colorbar(image, cax=fig.add_subplot(spec[row, grid['columns']])).ax.tick_params(labelsize=font)
      row += 1
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=DPI)
  plt.close(fig)
  # 256 colours hold viridis and the labels: a third of the RGBA file's bytes.
  from PIL import Image  # (matplotlib's own dependency)

  image = Image.open(buffer).convert('RGB').quantize(256)
  tmp = f'{path}.tmp-{os.getpid()}'
  image.save(tmp, format='PNG', optimize=True)
  os.replace(tmp, path)
  return image.size


# ---------------------------------------------------------------------------------------------------------------------
# The command


def _select(values, count: int, name: str) -> list[int]:
  if not values:
    return list(range(count))
  try:
    chosen = [int(v) - 1 for v in values]
  except ValueError:
    raise ValueError(f'--{name} takes 1-based integers, got {",".join(values)}') from None
  if any(not 0 <= c < count for c in chosen):
    raise ValueError(f'--{name}={",".join(values)} is out of range: the model has {count} {name} (1..{count})')
  return chosen


def run(FLAGS) -> None:
  if FLAGS.input is not None and FLAGS.text is not None:
    raise ValueError('give --text or --input, not both')
  if FLAGS.input is not None:
    if not os.path.exists(FLAGS.input):
      raise FileNotFoundError(f'--input={FLAGS.input} does not exist')
    with open(FLAGS.input, encoding='utf-8', errors='replace') as f:
      sentences = [line for line in f.read().splitlines() if line.strip()]
    if not sentences:
      raise ValueError(f'--input={FLAGS.input} has no non-empty line')
  else:
    if not (FLAGS.text or '').strip():
      raise ValueError('--text is empty: give a sentence to translate (or --input=FILE)')
    sentences = [FLAGS.text]
  from transformer_jax.storage import paths

  if not paths.isdir(FLAGS.workdir):  # a gs:// workdir too (the image --out is written locally)
    raise FileNotFoundError(f'--workdir={FLAGS.workdir} does not exist')
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  if not os.path.isdir(out_dir):
    raise FileNotFoundError(f'--out={FLAGS.out}: directory {out_dir} does not exist')
  if FLAGS.max_tokens < 1:
    raise ValueError(f'--max_tokens must be >= 1, got {FLAGS.max_tokens}')

  loaded = inference.load_workdir(FLAGS.workdir, FLAGS.config)
  layers = _select(FLAGS.layers, loaded.cfg.num_layers, 'layers')
  heads = _select(FLAGS.heads, loaded.cfg.num_heads, 'heads')
  all_maps = compute(loaded, sentences, beam_size=FLAGS.beam_size, alpha=FLAGS.alpha)

  drawn = all_maps[:MAX_SENTENCES]
  if len(all_maps) > MAX_SENTENCES:
    print(f'note: drawing the first {MAX_SENTENCES} of {len(all_maps)} sentences', flush=True)
  for number, maps in enumerate(all_maps):
    print(f'source {number + 1}: {maps.source}')
    print(f'translation {number + 1}: {maps.translation}')
    if number < MAX_SENTENCES:
      longest = max(len(maps.source_pieces), len(maps.target_pieces))
      if longest > FLAGS.max_tokens:
        print(
          f'note: sentence {number + 1} has {len(maps.source_pieces)} source and {len(maps.target_pieces)} '
          f'target tokens; the picture shows the first {FLAGS.max_tokens} of each (--max_tokens)'
        )
    print(f'alignment {number + 1} (target -> most attended source, last layer, mean of heads):')
    for target, source in alignment(maps):
      print(f'  {target} -> {source}')
  sys.stdout.flush()

  width, height = draw(drawn, FLAGS.out, layers=layers, heads=heads, max_tokens=FLAGS.max_tokens)
  print(
    f'wrote {FLAGS.out} ({width}x{height} px; step {loaded.step}, layers '
    f'{",".join(str(l + 1) for l in layers)}, heads {",".join(str(h + 1) for h in heads)})',
    flush=True,
  )
  if FLAGS.json:
    record = {
      'step': loaded.step,
      'layers': [l + 1 for l in layers],
      'heads': [h + 1 for h in heads],
      'shapes': {k: '[layers, heads, queries, keys]' for k in KINDS},
      'sentences': [
        {
          'source': m.source,
          'translation': m.translation,
          'source_pieces': m.source_pieces,
          'target_pieces': m.target_pieces,
          'decoder_input_pieces': m.decoder_input_pieces,
          **{k: m.weights[k][layers][:, heads].round(6).tolist() for k in KINDS},
        }
        for m in all_maps
      ],
    }
    tmp = f'{FLAGS.json}.tmp-{os.getpid()}'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(record, f, ensure_ascii=False)
    os.replace(tmp, FLAGS.json)
    print(f'wrote {FLAGS.json}', flush=True)
