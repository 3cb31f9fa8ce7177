"""msgpack: flax.serialization.msgpack_serialize({'params': tree, 'metadata': {...}}).

`flax.serialization.msgpack_restore(data)['params']` is the parameter tree; metadata has the same keys as the
safetensors header's (format, config, tokenizer, step, dtype).
"""

from __future__ import annotations

from flax import serialization

from transformer_jax.export import files

NAME = 'msgpack'
SUMMARY = 'one file of parameters (+ spm.model beside it)'
WRITES_DIRECTORY = False


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  del dtype
  files.check_file_target(out, overwrite, tokenizer_path)


def write(source: files.Exportable, out: str, *, dtype: str, overwrite: bool, **unused) -> list[str]:
  del overwrite, unused
  payload = serialization.msgpack_serialize(
    {'params': files.cast(source.params, dtype), 'metadata': files.metadata(source, dtype)}
  )
  return files.write_with_tokenizer(source, out, payload)


def read(data: bytes, path: str) -> tuple[dict, dict]:
  try:
    restored = serialization.msgpack_restore(data)
  except Exception as e:  # (msgpack raises several types on damage)
    raise files.ExportError(f'{path} is not a readable msgpack export ({type(e).__name__}); export it again') from e
  if not isinstance(restored, dict) or 'params' not in restored:
    raise files.ExportError(f'{path} is not a transformer_jax msgpack export (no params)')
  return restored['params'], dict(restored.get('metadata', {}))
