"""ctranslate2: a directory CTranslate2 (OpenNMT's C++ inference engine) loads: `ctranslate2.Translator(DIR)` for a
translation model, `ctranslate2.Generator(DIR)` for a language model (model.kind='decoder').

Writes model.bin, config.json and shared_vocabulary.json (CTranslate2's own files) and spm.model (the
SentencePiece model) into the directory. Needs the optional `ctranslate2` package (`pip install .[serve]`).

The model is built through `ctranslate2.specs` directly (TransformerSpec / TransformerDecoderModelSpec), not through
CTranslate2's Marian converter, which expects OPUS-MT's vocabulary layout (PAD last, the decoder started from a zero
embedding) where models trained here use PAD 0 and start the decoder from BOS. The tokens are the SentencePiece
pieces, in id order; ids past the SentencePiece model (embedding rows without a piece) are `<unused_N>`.

What makes CTranslate2 compute our function:
- the sinusoidal table is given explicitly (ours interleaves sin and cos; CTranslate2's default puts them in halves),
  and a learned one is copied;
- LayerNorm epsilon is model_config.LAYER_NORM_EPSILON, embeddings are scaled as ours are (sqrt(D) or not);
- our decoders never emit PAD or BOS (decode.py): the output projection gets a bias of FORBIDDEN_LOGIT on those two
  rows, so CTranslate2 never picks them either, with no decoding option to remember;
- sources get EOS appended by CTranslate2 itself (config add_source_eos), as evaluate.encode_sources does, so a
  caller passes `sp.encode(text, out_type=str)`; the decoder starts from `<s>` (BOS).

Precision is CTranslate2's load-time choice: `Translator(DIR, compute_type='int8')` quantizes the float32 weights
per output channel on load (`--dtype=bfloat16` stores bfloat16 weights instead).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from transformer_jax.export import files
from transformer_jax.export.files import ExportError, Exportable, flatten
from transformer_jax.model.config import LAYER_NORM_EPSILON

NAME = 'ctranslate2'
SUMMARY = 'a directory ctranslate2.Translator / Generator loads (the [serve] extra)'
WRITES_DIRECTORY = True

# A logit so low that softmax gives its token probability 0 in float32 and float16 alike (float16's range ends at
# 65504), without making -inf, which turns a row that is all forbidden into NaN.
FORBIDDEN_LOGIT = -1.0e4

# Rows of the position table: CTranslate2 refuses positions past it (its max_input_length default is 1024).
MIN_POSITIONS = 1024

# Our activation names -> CTranslate2's (common_spec.Activation)
_ACTIVATIONS = {'relu': 'RELU', 'gelu': 'GELUTanh', 'gelu_exact': 'GELU', 'silu': 'SWISH'}


def _ctranslate2():
  try:
    import ctranslate2
    import ctranslate2.specs
  except ImportError:
    raise ExportError(
      '--format=ctranslate2 needs the ctranslate2 package: pip install "transformer-jax[serve]"'
    ) from None
  return ctranslate2


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  del dtype, tokenizer_path
  _ctranslate2()
  files.check_dir_target(out, overwrite)


def write(source: Exportable, out: str, *, dtype: str, overwrite: bool, **unused) -> list[str]:
  del unused, overwrite  # checked by check_target; files of the same names are replaced, others left alone
  spec = model_spec(source)
  spec.validate()
  spec.optimize(quantization='bfloat16' if dtype == 'bfloat16' else 'float32')
  written = []
  files.paths.makedirs(out)
  with tempfile.TemporaryDirectory() as staging:  # spec.save writes in place: stage, then write each file atomically
    spec.save(staging)
    for name in sorted(os.listdir(staging)):
      path = os.path.join(out, name)
      with open(os.path.join(staging, name), 'rb') as f:
        files.write_bytes(path, f.read())
      written.append(path)
  path = os.path.join(out, files.TOKENIZER_NAME)
  files.write_bytes(path, files.read(source.tokenizer_path))
  return written + [path]


def vocabulary(source: Exportable) -> list[str]:
  """The model's tokens in id order: SentencePiece pieces, then `<unused_N>` for rows without a piece."""
  if not source.tokenizer_path or os.path.isdir(source.tokenizer_path):
    raise ExportError(
      "ctranslate2 export needs the run's own SentencePiece model (spm.model); an imported Marian "
      'vocabulary is not supported: convert the original model with ct2-transformers-converter'
    )
  from transformer_jax.data import tokenizer as tokenizer_lib

  sp = tokenizer_lib.Tokenizer.load(source.tokenizer_path).processor
  size = source.cfg.vocab_size
  if sp.get_piece_size() > size:
    raise ExportError(f'the SentencePiece model has {sp.get_piece_size()} pieces, more than model.vocab_size={size}')
  tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
  return tokens + [f'<unused_{i}>' for i in range(len(tokens), size)]


def _check(cfg) -> None:
  if cfg.attention_window:
    raise ExportError(
      f'ctranslate2 cannot express model.attention_window={cfg.attention_window} (its models attend '
      'to every position); export safetensors, msgpack or stablehlo'
    )
  if cfg.activation not in _ACTIVATIONS:
    raise ExportError(f'ctranslate2 has no activation for model.activation={cfg.activation!r}')
  ids = cfg.special_ids
  if (ids.pad, ids.eos, ids.unk, ids.bos) != (0, 1, 2, 3):
    raise ExportError(
      f"ctranslate2 export needs the project's special ids (pad 0, eos 1, unk 2, bos 3), this model has {ids}"
    )


def _unscan(params, cfg):
  from transformer_jax.export import hf_marian

  return hf_marian._unscan(params, cfg.num_layers) if cfg.scan_layers else params


class _Weights:
  """Pops our flat parameters into CTranslate2's layout (torch's: Linear weights [out, in]); every parameter must be
  used exactly once (`finish`)."""

  def __init__(self, params, cfg):
    self.flat = {k: np.asarray(v, np.float32) for k, v in flatten(_unscan(params, cfg)).items()}
    self.cfg = cfg
    self.d, self.h, self.k = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads

  def pop(self, name):
    if name not in self.flat:
      raise ExportError(f'the checkpoint has no parameter {name}')
    return np.ascontiguousarray(self.flat.pop(name))

  def head_projection(self, name):
    """query/key/value kernel [D, H, K] -> weight [H*K, D], bias [H*K] (zeros where the model has none)."""
    weight = self.pop(f'{name}.kernel').reshape(self.d, self.h * self.k).T
    bias = self.flat.pop(f'{name}.bias', None)
    return weight, (np.zeros(self.h * self.k, np.float32) if bias is None else bias.reshape(-1))

  def linear(self, spec, weight, bias):
    spec.weight = np.ascontiguousarray(weight, np.float32)
    spec.bias = np.ascontiguousarray(bias, np.float32)

  def layer_norm(self, spec, name):
    spec.gamma = self.pop(f'{name}.scale')
    spec.beta = self.pop(f'{name}.bias')

  def attention(self, spec, name, self_attention: bool):
    q, k, v = (self.head_projection(f'{name}.{p}') for p in ('query', 'key', 'value'))
    if self_attention:  # one fused [3D, D] projection
      self.linear(spec.linear[0], np.concatenate([q[0], k[0], v[0]]), np.concatenate([q[1], k[1], v[1]]))
    else:  # queries from the decoder, keys and values fused from the encoder
      self.linear(spec.linear[0], q[0], q[1])
      self.linear(spec.linear[1], np.concatenate([k[0], v[0]]), np.concatenate([k[1], v[1]]))
    out = self.pop(f'{name}.out.kernel').reshape(self.h * self.k, self.d).T
    bias = self.flat.pop(f'{name}.out.bias', None)
    self.linear(
      spec.linear[2 if not self_attention else 1], out, np.zeros(self.d, np.float32) if bias is None else bias
    )

  def feed_forward(self, spec, name):
    self.linear(spec.linear_0, self.pop(f'{name}.wi.kernel').T, self.pop(f'{name}.wi.bias'))
    self.linear(spec.linear_1, self.pop(f'{name}.wo.kernel').T, self.pop(f'{name}.wo.bias'))

  def finish(self):
    if self.flat:
      raise ExportError(f'ctranslate2 export has no place for parameters {sorted(self.flat)[:3]}')


def _stack(w: _Weights, spec, side: str, embedding, cross: bool):
  """Embeddings, positions, layers and final norm of one side (spec: a TransformerEncoderSpec/DecoderSpec)."""
  cfg = w.cfg
  from transformer_jax.model.transformer import sinusoidal_table

  embeddings = spec.embeddings[0] if isinstance(spec.embeddings, list) else spec.embeddings
  embeddings.weight = embedding
  spec.scale_embeddings = True if cfg.scale_embeddings else False  # True: CTranslate2 multiplies by sqrt(D)
  if cfg.positional == 'learned':
    table = w.pop(f'{side}.positional.pos_embedding')
  else:
    table = sinusoidal_table(cfg.max_len, cfg.d_model)
  # Positions past the table read its last row, as ours do (model.PositionalEncoding's clip), up to
  # CTranslate2's default input and decoding lengths.
  rows = max(len(table), MIN_POSITIONS)
  spec.position_encodings.encodings = np.concatenate([table, np.repeat(table[-1:], rows - len(table), axis=0)])
  for i, layer in enumerate(spec.layer):
    name = f'{side}.layers_{i}'
    w.attention(layer.self_attention, f'{name}.self_attention', self_attention=True)
    w.layer_norm(layer.self_attention.layer_norm, f'{name}.self_attention_norm')
    if cross:
      w.attention(layer.attention, f'{name}.cross_attention', self_attention=False)
      w.layer_norm(layer.attention.layer_norm, f'{name}.cross_attention_norm')
    w.feed_forward(layer.ffn, f'{name}.feed_forward')
    w.layer_norm(layer.ffn.layer_norm, f'{name}.feed_forward_norm')
  if cfg.pre_norm:
    w.layer_norm(spec.layer_norm, f'{side}.final_norm')


def _projection(w: _Weights, spec, embedding):
  """The output projection (the embedding, tied, or output_projection) with PAD and BOS forbidden."""
  cfg = w.cfg
  if 'decoder.output_projection.kernel' in w.flat:
    weight = w.pop('decoder.output_projection.kernel').T
  else:
    weight = embedding
  bias = w.flat.pop('decoder.final_logits_bias', np.zeros(cfg.vocab_size, np.float32)).astype(np.float32)
  bias[[cfg.special_ids.pad, cfg.special_ids.bos]] = FORBIDDEN_LOGIT
  w.linear(spec.projection, weight, bias)


def model_spec(source: Exportable, tokens: list[str] | None = None):
  """The CTranslate2 model specification (weights set, vocabulary registered, not yet validated or saved); `tokens`
  (default: `vocabulary(source)`) names the ids, PAD, EOS, UNK and BOS as `<pad>`, `</s>`, `<unk>`, `<s>`."""
  ct2 = _ctranslate2()
  specs = ct2.specs
  cfg = source.cfg
  _check(cfg)
  tokens = vocabulary(source) if tokens is None else list(tokens)
  activation = getattr(specs.common_spec.Activation, _ACTIVATIONS[cfg.activation])
  w = _Weights(source.params, cfg)
  if cfg.kind == 'decoder':
    spec = specs.TransformerDecoderModelSpec.from_config(
      cfg.num_layers, cfg.num_heads, pre_norm=cfg.pre_norm, activation=activation
    )
    embedding = w.pop('embedding.embedding')
    _stack(w, spec.decoder, 'decoder', embedding, cross=False)
    _projection(w, spec.decoder, embedding)
    spec.register_vocabulary(tokens)
    config = dict(unk_token='<unk>', bos_token='<s>', eos_token='</s>')
  else:
    spec = specs.TransformerSpec.from_config(
      cfg.num_layers, cfg.num_heads, pre_norm=cfg.pre_norm, activation=activation
    )
    if cfg.share_embeddings:
      source_embedding = target_embedding = w.pop('shared_embedding.embedding')
    else:
      source_embedding = w.pop('source_embedding.embedding')
      target_embedding = w.pop('target_embedding.embedding')
    _stack(w, spec.encoder, 'encoder', source_embedding, cross=False)
    _stack(w, spec.decoder, 'decoder', target_embedding, cross=True)
    _projection(w, spec.decoder, target_embedding)
    spec.register_source_vocabulary(tokens)
    spec.register_target_vocabulary(tokens)
    config = dict(
      unk_token='<unk>',
      bos_token='<s>',
      eos_token='</s>',
      decoder_start_token='<s>',
      add_source_bos=False,
      add_source_eos=True,
    )
  w.finish()
  for key, value in dict(config, layer_norm_epsilon=LAYER_NORM_EPSILON).items():
    setattr(spec.config, key, value)
  return spec
