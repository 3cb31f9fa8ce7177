"""hf-marian: a directory `transformers.MarianMTModel` / `MarianTokenizer` load offline, and its import.

Export writes config.json, generation_config.json, model.safetensors, source.spm, target.spm, vocab.json,
tokenizer_config.json (+ transformer_jax_config.json, the run's config, used by import). The conversion is exact
(same logits up to float rounding): see `_marian_permutation`.

`transformer-jax import --format=hf-marian --path=HF_DIR --workdir=DIR` is the inverse: it writes an Orbax
checkpoint (step 0, fresh optimizer state) and its config into DIR, with the vocabulary: our own spm.model when the
directory's ids are ours (an export of this project), else the released model's own (OPUS-MT: source.spm and
target.spm through vocab.json, EOS 0, UNK 1, PAD = decoder start = the last id) in WORKDIR/marian/
(data/marian_vocab.py), so evaluate / translate / export / train (fine-tuning) work on it. Model options follow the
checkpoint: relu / gelu / gelu_new / swish feed-forward, attention biases, final_logits_bias, scaled or unscaled
embeddings. It refuses, in one line naming the field, what this model cannot represent: pre-norm or extra layer
norms, non-shared or untied embeddings, encoder and decoder of different depth, widths or vocabularies.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.training import train_state
from transformer_jax.inference import workdir as workdir_lib
from transformer_jax.data import tokenizer as tokenizer_lib
from transformer_jax.export import files
from transformer_jax.export.files import ExportError, Exportable, flatten, unflatten
from transformer_jax.export.safetensors import read_safetensors, write_safetensors
from transformer_jax.model.vocab import DEFAULT_SPECIAL_IDS, SpecialIds

# This format keeps the SentencePiece ids as the model's ids: the project's defaults (pad 0, eos 1, unk 2, bos 3).
IDS = DEFAULT_SPECIAL_IDS

NAME = 'hf-marian'
SUMMARY = 'a directory transformers.MarianMTModel / MarianTokenizer load'
WRITES_DIRECTORY = True


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  del dtype, tokenizer_path
  files.check_dir_target(out, overwrite)


def write(source: Exportable, out: str, *, dtype: str, overwrite: bool, **unused) -> list[str]:
  del unused
  return _export_hf_marian(source, out, dtype=dtype, overwrite=overwrite)


# HF Marian
#
# HF's MarianSinusoidalPositionalEmbedding puts sin(pos * w_i) in features [0, D/2) and cos(pos * w_i) in [D/2, D),
# where this model interleaves them (sin at 2i, cos at 2i+1; the same frequencies w_i). Every operation of a
# post-norm Transformer is equivariant under one fixed permutation of the model dimension, so exporting every
# d_model-indexed axis permuted (embeddings, layer-norm scales and biases, the d_model side of each projection and
# the FFN output bias) makes HF compute exactly our function in a permuted basis; logits (indexed by vocabulary)
# are unchanged. Attention projections are permuted on the d_model axis only; heads and head dims keep their order.


def _marian_permutation(d_model: int) -> np.ndarray:
  """hf_vector = our_vector[perm]: HF feature i < D/2 is our 2i (sin), HF feature D/2 + i is our 2i + 1 (cos)."""
  return np.concatenate([np.arange(0, d_model, 2), np.arange(1, d_model, 2)])


def _unscan(params, num_layers: int):
  """scan_layers params (a 'layers' subtree with a leading [N] axis) -> layers_0..N-1."""
  out = {}
  for key, value in params.items():
    if key == 'layers' and isinstance(value, dict):
      for i in range(num_layers):
        out[f'layers_{i}'] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], value)
    elif isinstance(value, dict):
      out[key] = _unscan(value, num_layers)
    else:
      out[key] = value
  return out


def _layer_map(side: str, i: int) -> list[tuple[str, str, str]]:
  """(our flat name, HF name, kind) for one layer; `side` is 'encoder' or 'decoder'."""
  ours, hf = f'{side}.layers_{i}', f'model.{side}.layers.{i}'
  attentions = [('self_attention', 'self_attn', 'self_attention_norm', 'self_attn_layer_norm')]
  if side == 'decoder':
    attentions.append(('cross_attention', 'encoder_attn', 'cross_attention_norm', 'encoder_attn_layer_norm'))
  rows = []
  for our_attn, hf_attn, our_norm, hf_norm in attentions:
    for our_proj, hf_proj in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
      rows.append((f'{ours}.{our_attn}.{our_proj}.kernel', f'{hf}.{hf_attn}.{hf_proj}', 'qkv'))
    rows.append((f'{ours}.{our_attn}.out.kernel', f'{hf}.{hf_attn}.out_proj', 'out'))
    rows.append((f'{ours}.{our_norm}', f'{hf}.{hf_norm}', 'norm'))
  rows.append((f'{ours}.feed_forward.wi', f'{hf}.fc1', 'fc1'))
  rows.append((f'{ours}.feed_forward.wo', f'{hf}.fc2', 'fc2'))
  rows.append((f'{ours}.feed_forward_norm', f'{hf}.final_layer_norm', 'norm'))
  return rows


def to_marian_state_dict(params, cfg) -> dict[str, np.ndarray]:
  """Our parameter tree -> HF MarianMTModel tensors (torch layout: Linear weights [out, in]), permuted."""
  if cfg.pre_norm:
    raise ExportError(
      'hf-marian needs a post-norm model (HF Marian has no pre-norm option); this one has model.pre_norm=True'
    )
  if cfg.positional != 'sinusoidal':
    raise ExportError(f'hf-marian needs sinusoidal positions; this model has model.positional={cfg.positional!r}')
  if not cfg.share_embeddings:
    raise ExportError(
      'hf-marian export needs model.share_embeddings=True (one matrix for source, target and '
      'output, as Marian ties them)'
    )
  if cfg.d_model % 2:
    raise ExportError(f'hf-marian needs an even d_model, got {cfg.d_model}')
  flat = flatten(_unscan(params, cfg.num_layers) if cfg.scan_layers else params)
  perm = _marian_permutation(cfg.d_model)
  d, h, k = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  state = {}
  embedding = flat.pop('shared_embedding.embedding')
  state['model.shared.weight'] = f32(embedding[:, perm])
  logits_bias = flat.pop('decoder.final_logits_bias', None)
  state['final_logits_bias'] = (
    np.zeros((1, cfg.vocab_size), np.float32) if logits_bias is None else f32(logits_bias).reshape(1, cfg.vocab_size)
  )
  for side in ('encoder', 'decoder'):
    for i in range(cfg.num_layers):
      for ours, hf, kind in _layer_map(side, i):
        bias = flat.pop(ours[: -len('kernel')] + 'bias', None) if kind in ('qkv', 'out') else None
        if kind == 'qkv':  # the key has no bias here (softmax ignores it): HF gets zeros
          state[f'{hf}.weight'] = f32(flat.pop(ours)[perm].reshape(d, h * k).T)
          state[f'{hf}.bias'] = np.zeros((h * k,), np.float32) if bias is None else f32(bias.reshape(h * k))
        elif kind == 'out':
          state[f'{hf}.weight'] = f32(flat.pop(ours).reshape(h * k, d)[:, perm].T)
          state[f'{hf}.bias'] = np.zeros((d,), np.float32) if bias is None else f32(bias[perm])
        elif kind == 'norm':
          state[f'{hf}.weight'] = f32(flat.pop(f'{ours}.scale')[perm])
          state[f'{hf}.bias'] = f32(flat.pop(f'{ours}.bias')[perm])
        elif kind == 'fc1':
          state[f'{hf}.weight'] = f32(flat.pop(f'{ours}.kernel')[perm].T)
          state[f'{hf}.bias'] = f32(flat.pop(f'{ours}.bias'))
        else:  # fc2
          state[f'{hf}.weight'] = f32(flat.pop(f'{ours}.kernel')[:, perm].T)
          state[f'{hf}.bias'] = f32(flat.pop(f'{ours}.bias')[perm])
  if flat:
    raise ExportError(f'hf-marian has no place for parameters {sorted(flat)[:3]}')
  return state


def from_marian_state_dict(state: dict[str, np.ndarray], cfg) -> dict:
  """HF MarianMTModel tensors -> our parameter tree (inverse permutation). Refuses what we cannot represent."""
  state = {k: np.asarray(v, np.float32) for k, v in state.items()}
  d, h, k = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
  inverse = np.argsort(_marian_permutation(d))
  embeddings = [
    n
    for n in (
      'model.shared.weight',
      'model.encoder.embed_tokens.weight',
      'model.decoder.embed_tokens.weight',
      'lm_head.weight',
    )
    if n in state
  ]
  if not embeddings:
    raise ExportError('the HF checkpoint has no token embedding (model.shared.weight)')
  embedding = state[embeddings[0]]
  for other in embeddings[1:]:
    if state[other].shape != embedding.shape or not np.array_equal(state[other], embedding):
      raise ExportError(
        f'{other} differs from {embeddings[0]}: non-shared embeddings cannot be imported '
        '(this model ties source, target and output embeddings)'
      )
  if embedding.shape != (cfg.vocab_size, d):
    raise ExportError(f'{embeddings[0]} has shape {embedding.shape}, expected {(cfg.vocab_size, d)}')
  bias = state.get('final_logits_bias')
  flat = {'shared_embedding.embedding': embedding[:, inverse]}
  if cfg.final_logits_bias:
    flat['decoder.final_logits_bias'] = (
      np.zeros(cfg.vocab_size, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(cfg.vocab_size)
    )
  elif bias is not None and np.any(bias != 0):
    raise ExportError('final_logits_bias is non-zero: this model has no output bias (model.final_logits_bias)')

  def take(name, shape):
    if name not in state:
      raise ExportError(f'the HF checkpoint has no {name}')
    if state[name].shape != shape:
      raise ExportError(f'{name} has shape {state[name].shape}, expected {shape}')
    return state[name]

  def zero_bias(name, size):
    b = state.get(name)
    if b is not None and (b.shape != (size,) or np.any(b != 0)):
      raise ExportError(f"{name} is non-zero: this model's attention projections have no biases")

  def attention_bias(name, size):
    """The bias when the model has them (model.use_bias), else it must be zero."""
    if not cfg.use_bias:
      zero_bias(name, size)
      return None
    return take(name, (size,)) if name in state else np.zeros(size, np.float32)

  for side in ('encoder', 'decoder'):
    for i in range(cfg.num_layers):
      for ours, hf, kind in _layer_map(side, i):
        if kind == 'qkv':
          flat[ours] = take(f'{hf}.weight', (h * k, d)).T[inverse].reshape(d, h, k)
          if hf.endswith('k_proj'):
            # q.(k + b) adds q.b to every key's logit of a query: softmax cancels it exactly, so it is dropped
            if f'{hf}.bias' in state:
              take(f'{hf}.bias', (h * k,))
          else:
            b = attention_bias(f'{hf}.bias', h * k)
            if b is not None:
              flat[ours[: -len('kernel')] + 'bias'] = b.reshape(h, k)
        elif kind == 'out':
          flat[ours] = take(f'{hf}.weight', (d, h * k)).T[:, inverse].reshape(h, k, d)
          b = attention_bias(f'{hf}.bias', d)
          if b is not None:
            flat[ours[: -len('kernel')] + 'bias'] = b[inverse]
        elif kind == 'norm':
          flat[f'{ours}.scale'] = take(f'{hf}.weight', (d,))[inverse]
          flat[f'{ours}.bias'] = take(f'{hf}.bias', (d,))[inverse]
        elif kind == 'fc1':
          flat[f'{ours}.kernel'] = take(f'{hf}.weight', (cfg.d_ff, d)).T[inverse]
          flat[f'{ours}.bias'] = take(f'{hf}.bias', (cfg.d_ff,))
        else:
          flat[f'{ours}.kernel'] = take(f'{hf}.weight', (d, cfg.d_ff)).T[:, inverse]
          flat[f'{ours}.bias'] = take(f'{hf}.bias', (d,))[inverse]
  return unflatten({n: np.ascontiguousarray(v, np.float32) for n, v in flat.items()})


def marian_vocab(tokenizer_path: str, vocab_size: int) -> dict[str, int]:
  """vocab.json: every SentencePiece piece -> its id (our ids ARE the SentencePiece ids: <pad> 0, </s> 1, <unk> 2,
  <s> 3); embedding rows beyond the SentencePiece vocabulary get placeholder names so ids decode."""
  sp = tokenizer_lib.Tokenizer.load(tokenizer_path).processor
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  for i in range(sp.get_piece_size(), vocab_size):
    vocab[f'<unused_{i}>'] = i
  return vocab


# Our activation names <-> HF's ACT2FN names (HF 'gelu' is the exact erf form; 'gelu_new' GPT-2's tanh form).
_HF_ACTIVATION = {'relu': 'relu', 'gelu_exact': 'gelu', 'gelu': 'gelu_new', 'silu': 'swish'}
_FROM_HF_ACTIVATION = {
  'relu': 'relu',
  'gelu': 'gelu_exact',
  'gelu_new': 'gelu',
  'gelu_pytorch_tanh': 'gelu',
  'swish': 'silu',
  'silu': 'silu',
}


def _marian_source(source: Exportable) -> str | None:
  """The workdir's Marian vocabulary directory (an imported released model), or None (our spm.model)."""
  from transformer_jax.data import marian_vocab

  path = source.tokenizer_path or ''
  for candidate in (path, os.path.join(os.path.dirname(path), marian_vocab.DIRECTORY)):
    if candidate and os.path.isdir(candidate) and marian_vocab.is_marian_dir(candidate):
      return candidate
  return None


def marian_config(source: Exportable, dtype: str = 'float32') -> dict:
  cfg, config = source.cfg, source.config
  ids = cfg.special_ids
  return {
    'architectures': ['MarianMTModel'],
    'model_type': 'marian',
    'vocab_size': cfg.vocab_size,
    'decoder_vocab_size': cfg.vocab_size,
    'd_model': cfg.d_model,
    'encoder_layers': cfg.num_layers,
    'decoder_layers': cfg.num_layers,
    'encoder_attention_heads': cfg.num_heads,
    'decoder_attention_heads': cfg.num_heads,
    'encoder_ffn_dim': cfg.d_ff,
    'decoder_ffn_dim': cfg.d_ff,
    'activation_function': _HF_ACTIVATION[cfg.activation],
    'max_position_embeddings': cfg.max_len,
    'scale_embedding': bool(cfg.scale_embeddings),
    # Marian's own flags for this layout (HF's MarianConfig has them fixed: post-norm, static sinusoids).
    'normalize_before': False,
    'normalize_embedding': False,
    'static_position_embeddings': True,
    'add_final_layer_norm': False,
    'share_encoder_decoder_embeddings': True,
    'tie_word_embeddings': True,
    'pad_token_id': ids.pad,
    'eos_token_id': ids.eos,
    'bos_token_id': ids.bos,
    'decoder_start_token_id': ids.bos,
    'forced_eos_token_id': None,
    'dropout': float(cfg.dropout_rate),
    'attention_dropout': 0.0,
    'activation_dropout': 0.0,
    'encoder_layerdrop': 0.0,
    'decoder_layerdrop': 0.0,
    'init_std': 0.02,
    'is_encoder_decoder': True,
    'use_cache': True,
    'dtype': dtype,
    'max_length': int(config.max_length) + 1,
    'num_beams': 1,
  }


def _export_hf_marian(source: Exportable, out: str, *, dtype: str, overwrite: bool) -> list[str]:
  del overwrite  # checked by check_target; files of the same names are replaced, others left alone
  if source.cfg.activation not in _HF_ACTIVATION:
    raise ExportError(f'hf-marian has no activation for model.activation={source.cfg.activation!r}')
  state = to_marian_state_dict(source.params, source.cfg)
  if dtype == 'bfloat16':
    state = {k: v.astype(np.dtype(jnp.bfloat16)) for k, v in state.items()}
  config = source.config
  ids = source.cfg.special_ids
  # Our greedy search as HF generation defaults: never generate PAD or BOS (decode.py), at most max_length tokens
  # (HF counts the decoder start token too). decode.py also stops at source length + 50, which HF cannot express.
  bad_words = [[ids.pad]] + ([[ids.bos]] if ids.bos != ids.pad else [])
  generation = {
    'decoder_start_token_id': ids.bos,
    'bos_token_id': ids.bos,
    'eos_token_id': ids.eos,
    'pad_token_id': ids.pad,
    'forced_eos_token_id': None,
    'max_length': int(config.max_length) + 1,
    'num_beams': 1,
    'do_sample': False,
    'bad_words_ids': bad_words,
  }
  tokenizer_config = {
    'tokenizer_class': 'MarianTokenizer',
    'source_lang': config.get('source_lang'),
    'target_lang': config.get('target_lang'),
    'model_max_length': int(config.max_length),
    'separate_vocabs': False,
    'unk_token': '<unk>',
    'eos_token': '</s>',
    'pad_token': '<pad>',
  }
  marian_dir = _marian_source(source)
  if marian_dir is None:  # our shared SentencePiece model: its ids are the model's
    tokenizer_config['bos_token'] = '<s>'
    vocab = marian_vocab(source.tokenizer_path, source.cfg.vocab_size)
    unused = [piece for piece in vocab if piece.startswith('<unused_')]
    if unused:  # embedding rows without a SentencePiece piece: special, so skip_special_tokens drops them as we do
      tokenizer_config['extra_special_tokens'] = unused
    source_bytes = target_bytes = files.read(source.tokenizer_path)
  else:  # an imported Marian vocabulary goes back as it came
    with open(os.path.join(marian_dir, 'vocab.json'), encoding='utf-8') as f:
      vocab = json.load(f)
    source_bytes = files.read(os.path.join(marian_dir, 'source.spm'))
    target_bytes = files.read(os.path.join(marian_dir, 'target.spm'))
  files.paths.makedirs(out)  # gs://: nothing to make; every file below is one whole-object upload
  written = []

  def put(name, writer, *args):
    path = os.path.join(out, name)
    writer(path, *args)
    written.append(path)

  put('model.safetensors', write_safetensors, state, {'format': 'pt'})
  put('config.json', files.write_json, marian_config(source, dtype))
  put('generation_config.json', files.write_json, generation)
  put('source.spm', files.write_bytes, source_bytes)
  put('target.spm', files.write_bytes, target_bytes)
  put('vocab.json', files.write_json, vocab)
  put('tokenizer_config.json', files.write_json, tokenizer_config)
  put('transformer_jax_config.json', files.write_json, json.loads(config.to_json_best_effort()) | {'step': source.step})
  return written


# ---------------------------------------------------------------------------------------------------------------------
# Import


def _read_hf_weights(path: str) -> dict[str, np.ndarray]:
  single = os.path.join(path, 'model.safetensors')
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(single):
    return read_safetensors(single)[0]
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for name in files:
      state.update(read_safetensors(os.path.join(path, name))[0])
    return state
  if any(os.path.exists(os.path.join(path, n)) for n in ('pytorch_model.bin', 'model.bin')):
    raise ExportError(
      f'{path} has only pickled torch weights, which are never loaded here: re-save it with '
      'save_pretrained(..., safe_serialization=True) to get model.safetensors'
    )
  raise FileNotFoundError(f'no model.safetensors in {path}')


def _check_marian_config(hf: dict) -> None:
  """Refuses, in one line naming the field, what this model cannot represent."""

  def need(key, want, default=None, why=''):
    have = hf.get(key, default)
    if have != want:
      raise ExportError(f'cannot import: config.json has {key}={have!r}, this model needs {want!r}{why}')

  if hf.get('model_type') not in ('marian', None):
    raise ExportError(f'cannot import model_type={hf.get("model_type")!r}: only marian')
  activation = hf.get('activation_function', 'gelu')
  if activation not in _FROM_HF_ACTIVATION:
    raise ExportError(
      f'cannot import: config.json has activation_function={activation!r}; supported: {", ".join(_FROM_HF_ACTIVATION)}'
    )
  need('normalize_before', False, False, ' (post-norm only)')
  need('add_final_layer_norm', False, False)
  need('normalize_embedding', False, False)
  need('static_position_embeddings', True, True, ' (sinusoidal positions)')
  need('share_encoder_decoder_embeddings', True, True, ' (shared embeddings)')
  need('tie_word_embeddings', True, True, ' (output projection tied to the embedding)')
  if hf.get('encoder_layers') != hf.get('decoder_layers'):
    raise ExportError(
      f'cannot import encoder_layers={hf.get("encoder_layers")} != decoder_layers='
      f'{hf.get("decoder_layers")}: this model has as many of each'
    )
  for a, b in (('encoder_attention_heads', 'decoder_attention_heads'), ('encoder_ffn_dim', 'decoder_ffn_dim')):
    if hf.get(a) != hf.get(b):
      raise ExportError(f'cannot import {a}={hf.get(a)} != {b}={hf.get(b)}: this model uses one value for both')
  if hf.get('decoder_vocab_size') not in (None, hf.get('vocab_size')):
    raise ExportError(
      f'cannot import decoder_vocab_size={hf.get("decoder_vocab_size")} != vocab_size='
      f'{hf.get("vocab_size")} (non-shared embeddings)'
    )
  if hf.get('d_model', 1) % 2:
    raise ExportError(f'cannot import an odd d_model={hf.get("d_model")}')
  for key in ('pad_token_id', 'eos_token_id', 'decoder_start_token_id'):
    if not isinstance(hf.get(key), int) or not 0 <= hf[key] < int(hf.get('vocab_size', 0)):
      raise ExportError(f'cannot import: config.json has {key}={hf.get(key)!r}, not an id of the vocabulary')


def _vocabulary(path: str, hf: dict):
  """('sentencepiece', spm path, ids) when the directory's vocabulary is ours (one SentencePiece model whose ids ARE
  the model's ids: PAD 0, EOS 1, UNK 2, decoder start 3, as our export writes it), else ('marian', None, ids) for a
  released one (source.spm / target.spm through vocab.json, the checkpoint's special ids)."""
  source, target, vocab_path = (os.path.join(path, n) for n in ('source.spm', 'target.spm', 'vocab.json'))
  for p in (source, target if os.path.exists(target) else source, vocab_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'no {os.path.basename(p)} in {path}')
  if hf.get('separate_vocabs') or os.path.exists(os.path.join(path, 'target_vocab.json')):
    raise ExportError('cannot import separate_vocabs=True (a target_vocab.json): this model has one vocabulary')
  with open(vocab_path, encoding='utf-8') as f:
    vocab = json.load(f)
  for piece in ('<unk>', '</s>'):
    if piece not in vocab:
      raise ExportError(f'vocab.json has no {piece}')
  if max(vocab.values()) >= int(hf['vocab_size']) or min(vocab.values()) < 0:
    raise ExportError(f'vocab.json has ids up to {max(vocab.values())}, beyond vocab_size={hf["vocab_size"]}')
  if vocab['</s>'] != hf['eos_token_id']:
    raise ExportError(f'vocab.json maps </s> to {vocab["</s>"]} but config.json has eos_token_id={hf["eos_token_id"]}')
  if '<pad>' in vocab and vocab['<pad>'] != hf['pad_token_id']:
    raise ExportError(
      f'vocab.json maps <pad> to {vocab["<pad>"]} but config.json has pad_token_id={hf["pad_token_id"]}'
    )
  ids = SpecialIds(
    pad=int(hf['pad_token_id']),
    eos=int(hf['eos_token_id']),
    unk=int(vocab['<unk>']),
    bos=int(hf['decoder_start_token_id']),
  )
  same_spm = not os.path.exists(target) or files.read(target) == files.read(source)
  if same_spm and ids == IDS:
    try:
      sp = tokenizer_lib.Tokenizer.load(source).processor
    except ValueError:  # other SentencePiece special ids: a released vocabulary
      sp = None
    if sp is not None and all(vocab.get(sp.id_to_piece(i)) == i for i in range(sp.get_piece_size())):
      return 'sentencepiece', source, ids
  return 'marian', None, ids


def import_hf_marian(path: str, workdir: str, *, config=None, overwrite: bool = False) -> int:
  """Converts the HF Marian directory `path` into an orbax checkpoint (step 0) + config + vocabulary in workdir.

  The vocabulary: spm.model when the directory's is ours (see _vocabulary), else WORKDIR/marian/ (source.spm,
  target.spm, vocab.json, special_ids.json: data/marian_vocab.py) and config.vocabulary='marian'.
  `config` (a ConfigDict) supplies everything HF does not describe (data, lengths, optimizer, mesh); default: the
  transformer_jax_config.json an hf-marian export wrote (the CLI passes its default config otherwise). Returns the
  number of parameters."""
  from transformer_jax.data import marian_vocab

  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'--path={path} is not a directory')
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no config.json in {path}')
  with open(config_path) as f:
    hf = json.load(f)
  _check_marian_config(hf)
  kind, spm_path, ids = _vocabulary(path, hf)
  state = _read_hf_weights(path)
  run = workdir_lib.Workdir(workdir)
  checkpoints = run.checkpoint_dir
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    if not overwrite:
      raise ExportError(f'{workdir} already has checkpoints; pass --overwrite to replace them')
  target_spm = run.tokenizer_path
  if (
    kind == 'sentencepiece'
    and os.path.exists(target_spm)
    and files.read(target_spm) != files.read(spm_path)
    and not overwrite
  ):
    raise ExportError(f'{target_spm} exists with another vocabulary; pass --overwrite to replace it')

  def nonzero(names):
    return any(np.any(np.asarray(v) != 0) for n, v in state.items() if any(n.endswith(x) for x in names))

  config = files.config_for_import(path, config, 'fine-tune')
  config.model.update(
    vocab_size=int(hf['vocab_size']),
    num_layers=int(hf['encoder_layers']),
    d_model=int(hf['d_model']),
    num_heads=int(hf['encoder_attention_heads']),
    d_ff=int(hf['encoder_ffn_dim']),
    dropout_rate=float(hf.get('dropout', 0.1)),
    share_embeddings=True,
    pre_norm=False,
    positional='sinusoidal',
    scan_layers=False,
    activation=_FROM_HF_ACTIVATION[hf.get('activation_function', 'gelu')],
    scale_embeddings=bool(hf.get('scale_embedding', False)),
    # q/v/out biases (the key's is exactly redundant); on when the checkpoint has any
    use_bias=nonzero(('q_proj.bias', 'v_proj.bias', 'out_proj.bias')),
    final_logits_bias=nonzero(('final_logits_bias',)),
    special_ids=ids.to_dict(),
  )
  config.vocabulary = kind
  cfg = train_state.model_config(config, special_ids=ids)
  params = from_marian_state_dict(state, cfg)

  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    shutil.rmtree(checkpoints)  # overwrite, checked above
  os.makedirs(run.path, exist_ok=True)
  if kind == 'marian':
    source = files.read(os.path.join(path, 'source.spm'))
    target_file = os.path.join(path, 'target.spm')
    target = files.read(target_file) if os.path.exists(target_file) else source
    with open(os.path.join(path, 'vocab.json'), encoding='utf-8') as f:
      vocab = json.load(f)
    marian_vocab.write_marian_dir(run.marian_dir, source, target, vocab, ids)
    marian_vocab.MarianVocab.load(run.marian_dir)  # parses: both SentencePiece models load
  run.write_checkpoint(config, params, step=0)
  if kind == 'sentencepiece':
    files.write_bytes(target_spm, files.read(spm_path))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
