"""Exporting a trained workdir to formats other tools load, and importing HF Marian checkpoints.

`transformer-jax export --workdir=DIR --format=F --out=PATH [--checkpoint=STEP|STEP_DIR] [--dtype=bfloat16]`

Formats
-------
safetensors  One file of flat tensors. A parameter's name is its path in the Flax parameter tree joined by dots,
             with its native shape, e.g.
               shared_embedding.embedding                      [V, D]
               encoder.layers_0.self_attention.query.kernel    [D, H, K]   (also key, value)
               encoder.layers_0.self_attention.out.kernel      [H, K, D]
               encoder.layers_0.self_attention_norm.scale      [D]         (and .bias)
               encoder.layers_0.feed_forward.wi.kernel         [D, F]      (and .bias [F]; wo: [F, D], [D])
               decoder.layers_0.cross_attention.query.kernel   [D, H, K]
             (source_embedding / target_embedding / decoder.output_projection.kernel when embeddings are not
             shared; encoder.layers.* with a leading [N] axis for scan_layers models; *.final_norm for pre-norm).
             The header's __metadata__ holds `format` (transformer_jax), `config` (the run's ConfigDict as JSON),
             `tokenizer` (the file name of the SentencePiece model copied beside PATH), `step` and `dtype`.
             Written by this module (the format is a little-endian u64 header length, a JSON header, raw bytes),
             so exporting needs no extra package; `safetensors.safe_open` and `load_params` read it.
msgpack      flax.serialization.msgpack_serialize({'params': tree, 'metadata': {...same keys as above...}}):
             `flax.serialization.msgpack_restore(data)['params']` is the parameter tree.
hf-marian    A directory `transformers.MarianMTModel.from_pretrained(PATH)` and `MarianTokenizer.from_pretrained(PATH)`
             load offline: config.json, generation_config.json, model.safetensors, source.spm, target.spm,
             vocab.json, tokenizer_config.json (+ transformer_jax_config.json, the run's config, used by import).
             The conversion is exact (same logits up to float rounding): see `_marian_permutation`.
stablehlo    `jax.export` of greedy translation with the parameters baked in: int32 source ids [b, s] (b symbolic,
             s <= the model's max_len; each row EOS-terminated, then PAD=0) -> int32 target ids [b, max_length],
             PAD after the first EOS. Serialized with `Exported.serialize()`; lowered for cpu, cuda and tpu.

Every file format also writes `spm.model` (the SentencePiece model: PAD 0, EOS 1, UNK 2, BOS 3) beside PATH.
An existing non-empty target is never replaced without `overwrite=True` (`--overwrite`); every target is
checked before anything is written, and files are written to a temporary name and renamed into place.

Serving the StableHLO artifact (no project code needed, only jax and sentencepiece):

    import jax, numpy as np, sentencepiece as spm
    exported = jax.export.deserialize(open('model.stablehlo', 'rb').read())
    sp = spm.SentencePieceProcessor(model_file='spm.model')
    ids = [sp.encode(s) + [1] for s in sentences]                       # EOS = 1
    rows = np.zeros((len(ids), max(map(len, ids))), np.int32)            # PAD = 0
    for i, row in enumerate(ids):
      rows[i, :len(row)] = row
    out = np.asarray(exported.call(rows))                                # [b, max_length]
    texts = []
    for row in out.tolist():
      row = row[:row.index(1)] if 1 in row else row                     # up to the first EOS
      texts.append(sp.decode([t for t in row if t not in (0, 3) and t < sp.get_piece_size()]))

`exported.call` works under `jax.jit` too; to serve from another runtime (C++ PJRT, IREE, TF Serving via
jax2tf), `exported.mlir_module_serialized` is the portable StableHLO bytecode.

`transformer-jax import --format=hf-marian --path=HF_DIR --workdir=DIR` is the inverse of hf-marian: it writes an
orbax checkpoint (step 0, fresh optimizer state), its config and spm.model into DIR, so evaluate / translate /
export / train (fine-tuning) work on it. It refuses what this model cannot represent: non-zero attention or
final-logits biases, non-shared embeddings, activations other than relu, unscaled embeddings, and vocabularies
whose vocab.json ids differ from the SentencePiece ids (the PAD 0, EOS 1, UNK 2, decoder start 3 convention).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from transformer_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

FORMATS = ('safetensors', 'msgpack', 'hf-marian', 'stablehlo')
DTYPES = ('float32', 'bfloat16')
TOKENIZER_NAME = 'spm.model'
FORMAT_TAG = 'transformer_jax'


class ExportError(ValueError):
  """A one-line refusal: bad target, unknown format, something a format cannot represent."""


@dataclasses.dataclass
class Exportable:
  config: ml_collections.ConfigDict
  cfg: Any  # model.ModelConfig
  params: Any  # nested dict of numpy float32 arrays
  tokenizer_path: str
  step: int


# ---------------------------------------------------------------------------------------------------------------------
# Reading a checkpoint


def load_checkpoint(workdir: str, checkpoint: str | int | None = None, config=None) -> Exportable:
  """Parameters of the newest good checkpoint of workdir (or `checkpoint`: a step number or a step directory such
  as WORKDIR/checkpoints/400), restored onto one device; config from the checkpoint unless given."""
  from transformer_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax import optim  # pylint: disable=g-import-not-at-top
  from transformer_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.model import Transformer  # pylint: disable=g-import-not-at-top

  root, step = workdir, None
  if checkpoint is not None and str(checkpoint) != '':
    text = str(checkpoint).rstrip('/')
    if text.isdigit():
      step = int(text)
    elif os.path.isdir(text) and os.path.basename(text).isdigit():
      step = int(os.path.basename(text))
      root = os.path.dirname(os.path.dirname(os.path.abspath(text)))  # WORKDIR/checkpoints/STEP -> WORKDIR
    else:
      raise ExportError(f'--checkpoint={checkpoint} is neither a step number nor a checkpoint step directory')
  if not os.path.isdir(checkpoint_lib.checkpoint_dir(root)):
    raise FileNotFoundError(f'no checkpoint in {checkpoint_lib.checkpoint_dir(root)}: train first')
  checkpointer = checkpoint_lib.Checkpointer(root, read_only=True)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}: train first')
    if step is not None and step not in steps:
      raise FileNotFoundError(f'no checkpoint step {step} in {checkpointer.directory} (have {steps})')
    if config is None:
      config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    cfg = train_lib.model_config(config)
    model = Transformer(cfg)
    tx = optim.make_optimizer(config)
    device = jax.sharding.SingleDeviceSharding(_host_device())  # the whole state in host memory, not on a GPU
    specs = train_lib.state_logical_specs(model, tx, config)
    shardings = jax.tree.map(lambda _: device, specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    state, _, step = checkpointer.restore(train_lib.abstract_state(model, tx, config, shardings), step=step)
  finally:
    checkpointer.close()
  tokenizer_path = next((p for p in (os.path.join(workdir, TOKENIZER_NAME), os.path.join(root, TOKENIZER_NAME))
                         if os.path.exists(p)), None)
  if tokenizer_path is None:
    raise FileNotFoundError(f'no tokenizer at {os.path.join(workdir, TOKENIZER_NAME)}')
  params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), state.params)
  return Exportable(config=config, cfg=cfg, params=params, tokenizer_path=tokenizer_path, step=int(step))


def _host_device():
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # JAX_PLATFORMS without cpu
    return jax.local_devices()[0]


# ---------------------------------------------------------------------------------------------------------------------
# Flat names and safetensors (written and read here: the format is a header length, a JSON header, raw bytes)


def flatten(params, prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'encoder.layers_0.self_attention.query.kernel': array, ...}."""
  flat = {}
  for key, value in params.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict) or hasattr(value, 'items'):
      flat.update(flatten(value, name + '.'))
    else:
      flat[name] = value
  return flat


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('.')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


_ST_DTYPES = {'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16), 'BF16': np.dtype(jnp.bfloat16),
              'F64': np.dtype(np.float64), 'I32': np.dtype(np.int32), 'I64': np.dtype(np.int64),
              'U8': np.dtype(np.uint8), 'I8': np.dtype(np.int8), 'BOOL': np.dtype(np.bool_)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  header: dict[str, Any] = {}
  arrays = []
  offset = 0
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    if array.dtype not in _ST_NAMES:
      raise ExportError(f'cannot write {name} of dtype {array.dtype} to safetensors')
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder('<'))
    header[name] = {'dtype': _ST_NAMES[array.dtype.newbyteorder('=')], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  encoded = json.dumps(header, separators=(',', ':')).encode('utf-8')
  encoded += b' ' * (-len(encoded) % 8)  # the reference writer aligns the data to 8 bytes
  with _atomic_open(path) as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for array in arrays:
      f.write(array.tobytes())


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise ExportError(f'{path} is not a safetensors file (too short)')
  (length,) = struct.unpack('<Q', data[:8])
  try:
    header = json.loads(data[8:8 + length])
  except ValueError as e:
    raise ExportError(f'{path} is not a safetensors file ({e})') from e
  metadata = header.pop('__metadata__', {}) or {}
  base = 8 + length
  tensors = {}
  for name, info in header.items():
    if info['dtype'] not in _ST_DTYPES:
      raise ExportError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    begin, end = info['data_offsets']
    dtype = _ST_DTYPES[info['dtype']].newbyteorder('<')
    array = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=base + begin)
    tensors[name] = array.astype(dtype.newbyteorder('=')).reshape(info['shape'])
  return tensors, metadata


# ---------------------------------------------------------------------------------------------------------------------
# Targets: checked before anything is written, written atomically


class _atomic_open:  # pylint: disable=invalid-name
  """open(path, 'wb') into a temporary file beside path, renamed into place on success."""

  def __init__(self, path: str):
    self.path = path
    self.tmp = f'{path}.tmp-{os.getpid()}-{time.time_ns()}'

  def __enter__(self):
    self.f = open(self.tmp, 'wb')
    return self.f

  def __exit__(self, exc_type, exc, tb):
    self.f.close()
    if exc_type is None:
      os.replace(self.tmp, self.path)
    elif os.path.exists(self.tmp):
      os.remove(self.tmp)


def _write_bytes(path: str, data: bytes) -> None:
  with _atomic_open(path) as f:
    f.write(data)


def _write_json(path: str, obj) -> None:
  _write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode('utf-8'))


def _check_file_targets(paths_and_bytes: list[tuple[str, bytes | None]], overwrite: bool) -> None:
  """Each target must be absent, identical (for known bytes), or overwrite must be given; never a directory."""
  for path, data in paths_and_bytes:
    if os.path.isdir(path):
      raise ExportError(f'{path} is a directory; give a file path')
    if os.path.exists(path) and not overwrite:
      if data is not None:
        with open(path, 'rb') as f:
          if f.read() == data:
            continue
      raise ExportError(f'{path} exists; pass --overwrite to replace it')
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise ExportError(f'{parent} is not a directory')


def _check_dir_target(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise ExportError(f'{path} exists and is not a directory')
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise ExportError(f'{path} exists and is not empty; pass --overwrite to write into it')


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


# ---------------------------------------------------------------------------------------------------------------------
# Export


def check_target(fmt: str, out: str, *, dtype: str = 'float32', overwrite: bool = False,
                 tokenizer_path: str | None = None) -> None:
  """Refuses (ExportError) an unknown format or dtype, or a target that exists, before any work is done."""
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; expected one of {", ".join(FORMATS)}')
  if dtype not in DTYPES:
    raise ExportError(f'unknown dtype {dtype!r}; expected one of {", ".join(DTYPES)}')
  if fmt == 'stablehlo' and dtype != 'float32':
    raise ExportError('stablehlo exports float32 parameters only (set model.dtype for the compute dtype)')
  if not out:
    raise ExportError('--out is required')
  if fmt == 'hf-marian':
    _check_dir_target(out, overwrite)
    return
  beside = os.path.join(os.path.dirname(os.path.abspath(out)), TOKENIZER_NAME)
  tokenizer_bytes = _read(tokenizer_path) if tokenizer_path and os.path.exists(tokenizer_path) else None
  _check_file_targets([(out, None), (beside, tokenizer_bytes)], overwrite)


def export(source: Exportable, fmt: str, out: str, *, dtype: str = 'float32', overwrite: bool = False,
           platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu')) -> list[str]:
  """Writes `source` as `fmt` to `out`; returns the paths written."""
  check_target(fmt, out, dtype=dtype, overwrite=overwrite, tokenizer_path=source.tokenizer_path)
  if fmt == 'hf-marian':
    return _export_hf_marian(source, out, dtype=dtype, overwrite=overwrite)
  tokenizer_bytes = _read(source.tokenizer_path)
  beside = os.path.join(os.path.dirname(os.path.abspath(out)), TOKENIZER_NAME)
  if fmt == 'stablehlo':
    payload = stablehlo_bytes(source, platforms=platforms)
  else:
    params = cast(source.params, dtype)
    metadata = {'format': FORMAT_TAG, 'config': source.config.to_json_best_effort(), 'tokenizer': TOKENIZER_NAME,
                'step': str(source.step), 'dtype': dtype}
    if fmt == 'msgpack':
      from flax import serialization  # pylint: disable=g-import-not-at-top
      payload = serialization.msgpack_serialize({'params': params, 'metadata': metadata})
    else:
      payload = None
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if fmt == 'safetensors':
    write_safetensors(out, flatten(params), metadata)
  else:
    _write_bytes(out, payload)
  _write_bytes(beside, tokenizer_bytes)
  return [out, beside]


def cast(params, dtype: str):
  return jax.tree.map(lambda x: np.asarray(x).astype(np.dtype(jnp.bfloat16) if dtype == 'bfloat16' else np.float32),
                      params)


def _is_safetensors(path: str) -> bool:
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) < 9:
    return False
  return struct.unpack('<Q', head[:8])[0] + 8 <= os.path.getsize(path) and head[8:9] == b'{'


def load_params(path: str) -> tuple[dict, dict[str, Any]]:
  """(parameter tree, metadata) of a safetensors or msgpack export; metadata['config'] is a ConfigDict and
  metadata['tokenizer'] the path of the SentencePiece model beside the file. Arrays keep the stored dtype."""
  try:
    return _load_params(path)
  except (ExportError, FileNotFoundError, IsADirectoryError):
    raise
  except Exception as e:  # pylint: disable=broad-except  (msgpack, json, numpy raise many types on damage)
    raise ExportError(f'{path} is damaged or not a transformer_jax export ({type(e).__name__}: '
                      f'{str(e).splitlines()[0][:120] if str(e) else "unreadable"}); export it again') from None


def _load_params(path: str) -> tuple[dict, dict[str, Any]]:
  if not _is_safetensors(path):
    from flax import serialization  # pylint: disable=g-import-not-at-top
    restored = serialization.msgpack_restore(_read(path))
    if not isinstance(restored, dict) or 'params' not in restored:
      raise ExportError(f'{path} is not a transformer_jax msgpack export (no params)')
    params = jax.tree.map(np.asarray, restored['params'])
    metadata = dict(restored.get('metadata', {}))
  else:
    tensors, metadata = read_safetensors(path)
    params = unflatten(tensors)
  if 'config' in metadata:
    metadata['config'] = ml_collections.ConfigDict(json.loads(metadata['config']))
  if 'tokenizer' in metadata:
    metadata['tokenizer'] = os.path.join(os.path.dirname(os.path.abspath(path)), metadata['tokenizer'])
  return params, metadata


def load_export(path: str) -> Exportable:
  """An Exportable (config, ModelConfig, float32 params, tokenizer) from a safetensors or msgpack export."""
  from transformer_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  params, metadata = load_params(path)
  if 'config' not in metadata:
    raise ExportError(f'{path} has no config metadata: not written by transformer-jax export')
  config = metadata['config']
  return Exportable(config=config, cfg=train_lib.model_config(config), params=cast(params, 'float32'),
                    tokenizer_path=metadata.get('tokenizer', ''), step=int(metadata.get('step', 0)))


# ---------------------------------------------------------------------------------------------------------------------
# StableHLO


def serving_function(params, cfg, max_decode_len: int):
  """inputs [b, s] int32 -> greedy target ids [b, max_decode_len], with `params` closed over (baked in)."""
  from transformer_jax import decode as decode_lib  # pylint: disable=g-import-not-at-top
  params = jax.tree.map(jnp.asarray, params)

  def translate(inputs):
    return decode_lib.greedy_decode(params, inputs, cfg=cfg, max_decode_len=max_decode_len)

  return jax.jit(translate)


def stablehlo_export(source: Exportable, platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu')):
  cfg = dataclasses.replace(source.cfg, dropout_rate=0.0)
  fn = serving_function(source.params, cfg, int(source.config.max_length))
  batch, length = jax.export.symbolic_shape('b, s', constraints=(f's <= {cfg.max_len}',))
  try:
    return jax.export.export(fn, platforms=tuple(platforms))(jax.ShapeDtypeStruct((batch, length), jnp.int32))
  except Exception as e:  # pylint: disable=broad-except
    if tuple(platforms) == (jax.default_backend(),):
      raise
    raise ExportError(f'lowering for platforms {",".join(platforms)} failed ({type(e).__name__}: '
                      f'{str(e).splitlines()[0] if str(e) else ""}); try --platforms={jax.default_backend()}') from e


def stablehlo_bytes(source: Exportable, platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu')) -> bytes:
  return bytes(stablehlo_export(source, platforms).serialize())


def load_stablehlo(path: str):
  """The deserialized jax.export.Exported; call it with `.call(int32 [b, s] ids)`."""
  return jax.export.deserialize(bytearray(_read(path)))


# ---------------------------------------------------------------------------------------------------------------------
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
    raise ExportError('hf-marian needs a post-norm model (HF Marian has no pre-norm option); this one has '
                      'model.pre_norm=True')
  if cfg.positional != 'sinusoidal':
    raise ExportError(f'hf-marian needs sinusoidal positions; this model has model.positional={cfg.positional!r}')
  if not cfg.share_embeddings:
    raise ExportError('hf-marian export needs model.share_embeddings=True (one matrix for source, target and '
                      'output, as Marian ties them)')
  if cfg.d_model % 2:
    raise ExportError(f'hf-marian needs an even d_model, got {cfg.d_model}')
  flat = flatten(_unscan(params, cfg.num_layers) if cfg.scan_layers else params)
  perm = _marian_permutation(cfg.d_model)
  d, h, k = cfg.d_model, cfg.num_heads, cfg.d_model // cfg.num_heads
  f32 = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  state = {}
  embedding = flat.pop('shared_embedding.embedding')
  state['model.shared.weight'] = f32(embedding[:, perm])
  state['final_logits_bias'] = np.zeros((1, cfg.vocab_size), np.float32)
  for side in ('encoder', 'decoder'):
    for i in range(cfg.num_layers):
      for ours, hf, kind in _layer_map(side, i):
        if kind == 'qkv':
          state[f'{hf}.weight'] = f32(flat.pop(ours)[perm].reshape(d, h * k).T)
          state[f'{hf}.bias'] = np.zeros((h * k,), np.float32)
        elif kind == 'out':
          state[f'{hf}.weight'] = f32(flat.pop(ours).reshape(h * k, d)[:, perm].T)
          state[f'{hf}.bias'] = np.zeros((d,), np.float32)
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
  embeddings = [n for n in ('model.shared.weight', 'model.encoder.embed_tokens.weight',
                            'model.decoder.embed_tokens.weight', 'lm_head.weight') if n in state]
  if not embeddings:
    raise ExportError('the HF checkpoint has no token embedding (model.shared.weight)')
  embedding = state[embeddings[0]]
  for other in embeddings[1:]:
    if state[other].shape != embedding.shape or not np.array_equal(state[other], embedding):
      raise ExportError(f'{other} differs from {embeddings[0]}: non-shared embeddings cannot be imported '
                        '(this model ties source, target and output embeddings)')
  if embedding.shape != (cfg.vocab_size, d):
    raise ExportError(f'{embeddings[0]} has shape {embedding.shape}, expected {(cfg.vocab_size, d)}')
  bias = state.get('final_logits_bias')
  if bias is not None and np.any(bias != 0):
    raise ExportError('final_logits_bias is non-zero: this model has no output bias')
  flat = {'shared_embedding.embedding': embedding[:, inverse]}

  def take(name, shape):
    if name not in state:
      raise ExportError(f'the HF checkpoint has no {name}')
    if state[name].shape != shape:
      raise ExportError(f'{name} has shape {state[name].shape}, expected {shape}')
    return state[name]

  def zero_bias(name, size):
    b = state.get(name)
    if b is not None and (b.shape != (size,) or np.any(b != 0)):
      raise ExportError(f'{name} is non-zero: this model\'s attention projections have no biases')

  for side in ('encoder', 'decoder'):
    for i in range(cfg.num_layers):
      for ours, hf, kind in _layer_map(side, i):
        if kind == 'qkv':
          flat[ours] = take(f'{hf}.weight', (h * k, d)).T[inverse].reshape(d, h, k)
          zero_bias(f'{hf}.bias', h * k)
        elif kind == 'out':
          flat[ours] = take(f'{hf}.weight', (d, h * k)).T[:, inverse].reshape(h, k, d)
          zero_bias(f'{hf}.bias', d)
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
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
  vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
  for i in range(sp.get_piece_size(), vocab_size):
    vocab[f'<unused_{i}>'] = i
  return vocab


def marian_config(source: Exportable, dtype: str = 'float32') -> dict:
  cfg, config = source.cfg, source.config
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
      'activation_function': 'relu',
      'max_position_embeddings': cfg.max_len,
      'scale_embedding': True,
      # Marian's own flags for this layout (HF's MarianConfig has them fixed: post-norm, static sinusoids).
      'normalize_before': False,
      'normalize_embedding': False,
      'static_position_embeddings': True,
      'add_final_layer_norm': False,
      'share_encoder_decoder_embeddings': True,
      'tie_word_embeddings': True,
      'pad_token_id': PAD_ID,
      'eos_token_id': EOS_ID,
      'bos_token_id': BOS_ID,
      'decoder_start_token_id': BOS_ID,
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
  state = to_marian_state_dict(source.params, source.cfg)
  if dtype == 'bfloat16':
    state = {k: v.astype(np.dtype(jnp.bfloat16)) for k, v in state.items()}
  config = source.config
  # Our greedy search as HF generation defaults: never generate PAD or BOS (decode.py), at most max_length tokens
  # (HF counts the decoder start token too). decode.py also stops at source length + 50, which HF cannot express.
  generation = {'decoder_start_token_id': BOS_ID, 'bos_token_id': BOS_ID, 'eos_token_id': EOS_ID,
                'pad_token_id': PAD_ID, 'forced_eos_token_id': None, 'max_length': int(config.max_length) + 1,
                'num_beams': 1, 'do_sample': False, 'bad_words_ids': [[PAD_ID], [BOS_ID]]}
  tokenizer_config = {'tokenizer_class': 'MarianTokenizer', 'source_lang': config.get('source_lang'),
                      'target_lang': config.get('target_lang'), 'model_max_length': int(config.max_length),
                      'separate_vocabs': False, 'unk_token': '<unk>', 'eos_token': '</s>', 'pad_token': '<pad>',
                      'bos_token': '<s>'}
  vocab = marian_vocab(source.tokenizer_path, source.cfg.vocab_size)
  unused = [piece for piece in vocab if piece.startswith('<unused_')]
  if unused:  # embedding rows without a SentencePiece piece: special, so skip_special_tokens drops them as we do
    tokenizer_config['extra_special_tokens'] = unused
  tokenizer_bytes = _read(source.tokenizer_path)
  os.makedirs(out, exist_ok=True)
  written = []

  def put(name, writer, *args):
    path = os.path.join(out, name)
    writer(path, *args)
    written.append(path)

  put('model.safetensors', write_safetensors, state, {'format': 'pt'})
  put('config.json', _write_json, marian_config(source, dtype))
  put('generation_config.json', _write_json, generation)
  put('source.spm', _write_bytes, tokenizer_bytes)
  put('target.spm', _write_bytes, tokenizer_bytes)
  put('vocab.json', _write_json, vocab)
  put('tokenizer_config.json', _write_json, tokenizer_config)
  put('transformer_jax_config.json', _write_json, json.loads(config.to_json_best_effort()) | {'step': source.step})
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
    raise ExportError(f'{path} has only pickled torch weights, which are never loaded here: re-save it with '
                      'save_pretrained(..., safe_serialization=True) to get model.safetensors')
  raise FileNotFoundError(f'no model.safetensors in {path}')


def _check_marian_config(hf: dict) -> None:
  def need(key, want, default=None, why=''):
    have = hf.get(key, default)
    if have != want:
      raise ExportError(f'cannot import: config.json has {key}={have!r}, this model needs {want!r}{why}')

  if hf.get('model_type') not in ('marian', None):
    raise ExportError(f'cannot import model_type={hf.get("model_type")!r}: only marian')
  need('activation_function', 'relu', 'gelu', ' (the FFN is max(0, xW1+b1)W2+b2)')
  need('scale_embedding', True, False, ' (embeddings are scaled by sqrt(d_model))')
  need('normalize_before', False, False, ' (post-norm only)')
  need('add_final_layer_norm', False, False)
  need('normalize_embedding', False, False)
  need('static_position_embeddings', True, True, ' (sinusoidal positions)')
  need('share_encoder_decoder_embeddings', True, True, ' (shared embeddings)')
  need('tie_word_embeddings', True, True, ' (output projection tied to the embedding)')
  if hf.get('encoder_layers') != hf.get('decoder_layers'):
    raise ExportError(f'cannot import {hf.get("encoder_layers")} encoder and {hf.get("decoder_layers")} decoder '
                      'layers: this model has as many of each')
  for a, b in (('encoder_attention_heads', 'decoder_attention_heads'), ('encoder_ffn_dim', 'decoder_ffn_dim')):
    if hf.get(a) != hf.get(b):
      raise ExportError(f'cannot import {a}={hf.get(a)} != {b}={hf.get(b)}: this model uses one value for both')
  if hf.get('decoder_vocab_size') not in (None, hf.get('vocab_size')):
    raise ExportError('cannot import a decoder vocabulary of another size (non-shared embeddings)')
  need('pad_token_id', PAD_ID, None, ' (PAD 0, EOS 1, UNK 2, decoder start 3)')
  need('eos_token_id', EOS_ID, None, ' (PAD 0, EOS 1, UNK 2, decoder start 3)')
  need('decoder_start_token_id', BOS_ID, None, ' (PAD 0, EOS 1, UNK 2, decoder start 3)')
  if hf.get('d_model', 1) % 2:
    raise ExportError(f'cannot import an odd d_model={hf.get("d_model")}')


def _check_marian_vocab(path: str) -> str:
  """source.spm must be a SentencePiece model with our special ids whose pieces vocab.json maps to the same ids."""
  from transformer_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  source, target, vocab_path = (os.path.join(path, n) for n in ('source.spm', 'target.spm', 'vocab.json'))
  for p in (source, vocab_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f'no {os.path.basename(p)} in {path}')
  if os.path.exists(target) and _read(target) != _read(source):
    raise ExportError('source.spm and target.spm differ: this model has one shared vocabulary')
  tok = tokenizer_lib.Tokenizer.load(source)  # raises on other special ids
  with open(vocab_path, encoding='utf-8') as f:
    vocab = json.load(f)
  sp = tok.processor
  for i in range(sp.get_piece_size()):
    if vocab.get(sp.id_to_piece(i)) != i:
      raise ExportError(f'vocab.json maps {sp.id_to_piece(i)!r} to {vocab.get(sp.id_to_piece(i))} but source.spm '
                        f'gives it id {i}: only vocabularies whose ids are the SentencePiece ids can be imported '
                        f'(remapping a Helsinki-NLP vocabulary is not implemented)')
  if vocab.get('<unk>') != UNK_ID:
    raise ExportError(f'vocab.json maps <unk> to {vocab.get("<unk>")}, expected {UNK_ID}')
  return source


def import_hf_marian(path: str, workdir: str, *, config=None, overwrite: bool = False) -> int:
  """Converts the HF Marian directory `path` into an orbax checkpoint (step 0) + config + spm.model in workdir.

  `config` (a ConfigDict) supplies everything HF does not describe (data, lengths, optimizer, mesh); default: the
  transformer_jax_config.json an hf-marian export wrote, else configs/tiny.py. Returns the number of parameters."""
  from transformer_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  if not path or not os.path.isdir(path):
    raise FileNotFoundError(f'--path={path} is not a directory')
  config_path = os.path.join(path, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'no config.json in {path}')
  with open(config_path) as f:
    hf = json.load(f)
  _check_marian_config(hf)
  spm_path = _check_marian_vocab(path)
  checkpoints = checkpoint_lib.checkpoint_dir(workdir)
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    if not overwrite:
      raise ExportError(f'{workdir} already has checkpoints; pass --overwrite to replace them')
    shutil.rmtree(checkpoints)
  target_spm = os.path.join(workdir, TOKENIZER_NAME)
  if os.path.exists(target_spm) and _read(target_spm) != _read(spm_path) and not overwrite:
    raise ExportError(f'{target_spm} exists with another vocabulary; pass --overwrite to replace it')

  if config is None:
    saved = os.path.join(path, 'transformer_jax_config.json')
    if os.path.exists(saved):
      with open(saved) as f:
        config = ml_collections.ConfigDict({k: v for k, v in json.load(f).items() if k != 'step'})
    else:
      from configs import tiny  # pylint: disable=g-import-not-at-top
      config = tiny.get_config()
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
  config.model.update(vocab_size=int(hf['vocab_size']), num_layers=int(hf['encoder_layers']),
                      d_model=int(hf['d_model']), num_heads=int(hf['encoder_attention_heads']),
                      d_ff=int(hf['encoder_ffn_dim']), dropout_rate=float(hf.get('dropout', 0.1)),
                      share_embeddings=True, pre_norm=False, positional='sinusoidal', scan_layers=False)
  cfg = train_lib.model_config(config)
  params = from_marian_state_dict(_read_hf_weights(path), cfg)

  os.makedirs(workdir, exist_ok=True)
  write_checkpoint(workdir, config, params, step=0)
  _write_bytes(target_spm, _read(spm_path))
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def write_checkpoint(workdir: str, config, params, step: int = 0) -> None:
  """A checkpoint of `params` (a fresh optimizer state) that load_workdir / train can restore."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from transformer_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax import optim  # pylint: disable=g-import-not-at-top
  from transformer_jax import parallel  # pylint: disable=g-import-not-at-top
  from transformer_jax import train as train_lib  # pylint: disable=g-import-not-at-top
  from transformer_jax.model import Transformer  # pylint: disable=g-import-not-at-top

  model = Transformer(train_lib.model_config(config))
  tx = optim.make_optimizer(config)
  mesh = parallel.make_mesh(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.LOGICAL_AXIS_RULES):
    shardings = parallel.logical_shardings(train_lib.state_logical_specs(model, tx, config), mesh)
    abstract = train_lib.abstract_state(model, tx, config, shardings)  # shapes only: nothing is initialised
    if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(abstract.params):
      raise ExportError('the converted parameters do not match the model the config builds')
    for (name, want), have in zip(jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(params)):
      if tuple(want.shape) != tuple(np.shape(have)):
        raise ExportError(f'parameter {jax.tree_util.keystr(name)} has shape {np.shape(have)}, the model expects '
                          f'{tuple(want.shape)}')
    placed = jax.tree.map(lambda x, s: jax.device_put(np.asarray(x, np.float32), s), params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(placed)
    state = abstract.replace(step=jax.device_put(np.asarray(step, np.int32), shardings.step), params=placed,
                             opt_state=opt_state)
    checkpointer = checkpoint_lib.Checkpointer(workdir, keep=int(config.get('keep_checkpoints', 3)),
                                               async_save=False)
    checkpointer.save(step, state, {'epoch': 0, 'batch': 0, 'step': step},
                      json.loads(config.to_json_best_effort()), force=True)
    checkpointer.wait()
    checkpointer.close()
