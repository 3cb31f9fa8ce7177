"""stablehlo: `jax.export` of greedy translation with the parameters baked in.

int32 source ids [b, s] (b symbolic, s <= the model's max_len; each row EOS-terminated, then PAD) -> int32 target
ids [b, max_length], PAD after the first EOS. Serialized with `Exported.serialize()`; lowered for cpu, cuda and tpu.

Serving it needs no project code, only jax and sentencepiece:

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

`exported.call` works under `jax.jit` too; to serve from another runtime (C++ PJRT, IREE, TF Serving via jax2tf),
`exported.mlir_module_serialized` is the portable StableHLO bytecode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from transformer_jax.inference import decode as decode_lib
from transformer_jax.export import files

NAME = 'stablehlo'
SUMMARY = 'jax.export of greedy translation with the parameters baked in'
WRITES_DIRECTORY = False


def serving_function(params, cfg, max_decode_len: int):
  """inputs [b, s] int32 -> greedy target ids [b, max_decode_len], with `params` closed over (baked in)."""
  params = jax.tree.map(jnp.asarray, params)

  def translate(inputs):
    return decode_lib.greedy_decode(params, inputs, cfg=cfg, max_decode_len=max_decode_len)

  return jax.jit(translate)


def stablehlo_export(source: files.Exportable, platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu')):
  cfg = dataclasses.replace(source.cfg, dropout_rate=0.0)
  fn = serving_function(source.params, cfg, int(source.config.max_length))
  batch, length = jax.export.symbolic_shape('b, s', constraints=(f's <= {cfg.max_len}',))
  try:
    return jax.export.export(fn, platforms=tuple(platforms))(jax.ShapeDtypeStruct((batch, length), jnp.int32))
  except Exception as e:
    if tuple(platforms) == (jax.default_backend(),):
      raise
    raise files.ExportError(
      f'lowering for platforms {",".join(platforms)} failed ({type(e).__name__}: '
      f'{str(e).splitlines()[0] if str(e) else ""}); try --platforms={jax.default_backend()}'
    ) from e


def stablehlo_bytes(source: files.Exportable, platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu')) -> bytes:
  return bytes(stablehlo_export(source, platforms).serialize())


def load_stablehlo(path: str):
  """The deserialized jax.export.Exported; call it with `.call(int32 [b, s] ids)`."""
  return jax.export.deserialize(bytearray(files.read(path)))


def check_target(out: str, *, dtype: str, overwrite: bool, tokenizer_path: str | None) -> None:
  if dtype != 'float32':
    raise files.ExportError('stablehlo exports float32 parameters only (set model.dtype for the compute dtype)')
  files.check_file_target(out, overwrite, tokenizer_path)


def write(
  source: files.Exportable,
  out: str,
  *,
  dtype: str,
  overwrite: bool,
  platforms: tuple[str, ...] = ('cpu', 'cuda', 'tpu'),
  **unused,
) -> list[str]:
  del dtype, overwrite, unused
  return files.write_with_tokenizer(source, out, stablehlo_bytes(source, platforms=platforms))
