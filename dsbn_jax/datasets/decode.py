"""The one normalisation of an image file's bytes, shared by the dataset builders and predict.

`pipeline_bytes` turns the bytes of an image file into the bytes the input pipeline decodes
(`input_pipeline.decode_image`): the file is fully decoded with PIL (which catches truncation and
applies PIL's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`: a warning above it, a
`DecompressionBombError` above twice it, raised from the header before any pixel is allocated);
JPEG L/RGB and PNG 1/L/LA/P/RGB/RGBA bytes are kept as they are (TF decodes them to exactly PIL's
``.convert('RGB')`` pixels), anything else -- CMYK/YCCK JPEG, 16-bit or other exotic PNG modes,
GIF, BMP, TIFF, WebP, whatever the file name says -- becomes a lossless RGB PNG of PIL's
``.convert('RGB')``. The builders store its output (`folder.read_image_bytes`) and `predict`
classifies it, so a file gives the same pixels in training, evaluation and prediction.
"""

from __future__ import annotations

import io
import re
import struct

import PIL.Image

# The file names read as images, by the dataset builders and by predict alike (any other file is
# skipped); pipeline_bytes converts the containers TF does not decode as PIL would.
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# (PIL format, PIL mode) pairs whose bytes TF decodes to exactly PIL's .convert('RGB') pixels
# (JPEG: with dct_method='INTEGER_ACCURATE', see input_pipeline.decode_image).
KEEP_AS_IS = {
  'JPEG': frozenset({'L', 'RGB'}),
  'PNG': frozenset({'1', 'L', 'LA', 'P', 'RGB', 'RGBA'}),
}
# What PIL raises for a file it cannot read: not an image, truncated, damaged, or over the
# decompression-bomb limit (PIL.UnidentifiedImageError is an OSError).
READ_ERRORS = (
  OSError,
  SyntaxError,
  ValueError,
  EOFError,
  struct.error,
  PIL.Image.DecompressionBombError,
)


def pipeline_bytes(data: bytes) -> tuple[bytes, bool]:
  """(bytes the input pipeline decodes, converted?) of an image file's bytes; raises READ_ERRORS."""
  with PIL.Image.open(io.BytesIO(data)) as img:
    img.load()  # full decode: catches truncation, which Image.verify() does not
    if img.mode in KEEP_AS_IS.get(img.format, ()):
      return data, False
    out = io.BytesIO()
    img.convert('RGB').save(out, format='PNG')  # the reference's .convert('RGB'), losslessly
    return out.getvalue(), True


_BUFFER_REPR = re.compile(r'\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>')


def describe(error: BaseException) -> str:
  """One line naming a read error: its type and message (without PIL's name of our BytesIO)."""
  return ' '.join(f'{type(error).__name__}: {_BUFFER_REPR.sub("", str(error))}'.split())
