"""Where the evaluation crops sit: the reference's PlaceCrop origins (``image_test_10crop``,
``image_test``), shared by the host transforms (``transforms``, TensorFlow) and the device crops
(``device_augment``, JAX). Pure Python: neither framework is imported here."""

# 10-crop order of the reference's image_test_10crop: origins (x, y) in units of "first" = 0,
# "last" = resize - crop - 1 and "center" = (resize - crop - 1) / 2, applied first to the flipped
# (ForceFlip) image, then to the unflipped one.
TEN_CROP_ORIGINS = (
  ('first', 'first'),
  ('last', 'last'),
  ('last', 'first'),
  ('first', 'last'),
  ('center', 'center'),
)


def crop_offsets(resize_size: int, crop_size: int) -> dict[str, int]:
  """PlaceCrop origins; PIL rounds the crop box (half to even), so 15.5 -> 16 for 256/224."""
  return {
    'first': 0,
    'last': resize_size - crop_size - 1,
    'center': round((resize_size - crop_size - 1) / 2),
  }


def ten_crop_boxes(resize_size: int, crop_size: int) -> list[tuple[bool, int, int]]:
  """The 10 crops of a square image in the reference's order: (flipped, top, left) each."""
  offsets = crop_offsets(resize_size, crop_size)
  return [
    (flipped, offsets[y], offsets[x]) for flipped in (True, False) for x, y in TEN_CROP_ORIGINS
  ]
