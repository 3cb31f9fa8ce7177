"""safetensors: one file of flat tensors, written and read through the `safetensors` package.

A parameter's name is its path in the Flax parameter tree joined by dots, with its native shape, e.g.
  shared_embedding.embedding                      [V, D]
  encoder.layers_0.self_attention.query.kernel    [D, H, K]   (also key, value)
  encoder.layers_0.self_attention.out.kernel      [H, K, D]
  encoder.layers_0.self_attention_norm.scale      [D]         (and .bias)
  encoder.layers_0.feed_forward.wi.kernel         [D, F]      (and .bias [F]; wo: [F, D], [D])
  decoder.layers_0.cross_attention.query.kernel   [D, H, K]
(source_embedding / target_embedding / decoder.output_projection.kernel when embeddings are not shared;
encoder.layers.* with a leading [N] axis for scan_layers models; *.final_norm for pre-norm). The header's
__metadata__ holds `format` (transformer_jax), `config` (the run's ConfigDict as JSON), `tokenizer` (the file name of
the SentencePiece model copied beside the file), `step` and `dtype`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from transformer_jax.export import files

NAME = 'safetensors'
SUMMARY = 'one file of parameters (+ spm.model beside it)'
WRITES_DIRECTORY = False

# safetensors' numpy reader has no bfloat16; its parser gives the raw bytes, and these dtypes read them.
_DTYPES = {
  'F32': np.float32,
  'F16': np.float16,
  'BF16': jnp.bfloat16,
  'F64': np.float64,
  'I32': np.int32,
  'I64': np.int64,
  'U8': np.uint8,
  'I8': np.int8,
  'BOOL': np.bool_,
}


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
  arrays = {name: np.ascontiguousarray(np.asarray(a)) for name, a in tensors.items()}
  payload = safetensors.numpy.save(arrays, metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)
  files.write_bytes(path, payload)


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  data = files.read(path)
  try:
    tensors = safetensors.deserialize(data)
    with safetensors.safe_open(path, framework='np') as f:
      metadata = dict(f.metadata() or {})
  except Exception as e:  # (the parser raises its own error types on damage)
    raise files.ExportError(
      f'{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e!r}); export it again'
    ) from e
  out = {}
  for name, info in tensors:
    if info['dtype'] not in _DTYPES:
      raise files.ExportError(f'{path}: tensor {name} has unsupported dtype {info["dtype"]}')
    out[name] = (
      np.frombuffer(bytes(info['data']), dtype=np.dtype(_DTYPES[info['dtype']]).newbyteorder('<'))
      .astype(np.dtype(_DTYPES[info['dtype']]))
      .reshape(info['shape'])
    )
  return out, metadata


def is_safetensors(path: str) -> bool:
  head = files.read(path)[:9] if os.path.getsize(path) >= 9 else b''
  if len(head) < 9:
    return False
  return int.from_bytes(head[:8], 'little') + 8 <= os.path.getsize(path) and head[8:9] == b'{'


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  del dtype
  files.check_file_target(out, overwrite, tokenizer_path)


def write(source: files.Exportable, out: str, *, dtype: str, overwrite: bool, **unused) -> list[str]:
  del overwrite, unused
  params = files.cast(source.params, dtype)
  files.paths.makedirs(os.path.dirname(files.paths.resolve(out)))
  write_safetensors(out, files.flatten(params), files.metadata(source, dtype))
  files.write_bytes(files.tokenizer_beside(out), files.read(source.tokenizer_path))
  return [out, files.tokenizer_beside(out)]
