"""The resized-image cache file (dsbn_jax/image_cache.py): built once, reused memory-mapped, never
half-written; a data folder that cannot be written computes it in memory."""

import errno
import os

import numpy as np
import pytest

from dsbn_jax import image_cache

_N, _S = 5, 4


def _source(calls):
  names = np.array([b'a/1.png', b'a/2.png', b'b/1.png', b'b/3.png', b'c/0.png'], object)
  labels = np.array([0, 0, 1, 1, 2], np.int32)
  stored = np.array([3, 0, 4, 1, 2], np.int64)

  def names_and_labels():
    calls.append('list')
    return names, labels, stored

  def fill(out, stored_order):
    assert stored_order.tolist() == stored.tolist()  # what names_and_labels listed, not again
    calls.append('fill')
    for i in range(len(out)):
      out[i] = i * 10

  return names_and_labels, fill


def _build(folder, size, calls):
  names_and_labels, fill = _source(calls)
  return image_cache.load_or_build(
    str(folder), 'Art', size, 'bicubic', names_and_labels=names_and_labels, fill=fill
  )


def test_built_once_then_memory_mapped(tmp_path):
  calls = []
  first = _build(tmp_path, _S, calls)
  assert calls == ['list', 'fill'] and first.path is not None
  again = _build(tmp_path, _S, calls)
  assert calls == ['list', 'fill']  # nothing computed again
  assert isinstance(again.images, np.memmap) and not again.images.flags.writeable
  assert again.images.shape == (_N, _S, _S, 3) and again.images.dtype == np.uint8
  np.testing.assert_array_equal(again.images[:, 0, 0, 0], [0, 10, 20, 30, 40])
  assert list(again.names) == list(first.names) and again.labels.tolist() == [0, 0, 1, 1, 2]
  assert again.stored.tolist() == [3, 0, 4, 1, 2]
  # another size or method is another file
  other = _build(tmp_path, _S + 1, calls)
  assert other.path != again.path and calls[-1] == 'fill'


def test_a_failed_build_leaves_no_file_and_the_next_one_builds(tmp_path):
  calls = []
  names_and_labels, fill = _source(calls)

  def full(out, stored_order):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  with pytest.raises(OSError):
    image_cache.load_or_build(
      str(tmp_path), 'Art', _S, 'bicubic', names_and_labels=names_and_labels, fill=full
    )
  folder = tmp_path / image_cache.FOLDER
  assert [n for n in os.listdir(folder) if not n.endswith('.lock')] == []
  built = image_cache.load_or_build(
    str(tmp_path), 'Art', _S, 'bicubic', names_and_labels=names_and_labels, fill=fill
  )
  assert built.images[4, 0, 0, 0] == 40


def test_a_folder_that_cannot_be_written_computes_in_memory(tmp_path, monkeypatch):
  calls = []
  names_and_labels, fill = _source(calls)
  real_makedirs = os.makedirs

  def read_only(path, *args, **kwargs):
    if image_cache.FOLDER in str(path):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    return real_makedirs(path, *args, **kwargs)

  monkeypatch.setattr(os, 'makedirs', read_only)
  got = image_cache.load_or_build(
    str(tmp_path), 'Art', _S, 'bicubic', names_and_labels=names_and_labels, fill=fill
  )
  assert got.path is None and calls == ['list', 'fill'] and got.images[2, 0, 0, 0] == 20
  assert not (tmp_path / image_cache.FOLDER).exists()


@pytest.mark.parametrize('resize,crop,mode', [(32, 0, 'center'), (40, 32, '10crop')])
def test_eval_and_source_split_batches_from_the_cache_equal_decoding_each_time(
  digits_data_dir, resize, crop, mode
):
  """The evaluation reads the crops of the shared resized cache (no decode after the first run):
  the same pixels, labels, masks and order as decoding and resizing every image again."""
  from dsbn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from tests import data_fixtures  # pylint: disable=g-import-not-at-top

  data = data_fixtures.get_data_config('digits')
  data.data_dir, data.eval_batch_size, data.source_val_fraction = digits_data_dir, 64, 0.3
  data.resize_size, data.crop_size, data.eval_mode = resize, crop, mode  # 40: a real resize
  for make in (input_pipeline.make_eval_data, input_pipeline.make_source_val_data):
    batches = {}
    for cached in (True, False):
      data.cache_resized = cached
      for index in (0, 1):  # two processes' slices
        got = make(data, process_index=index, process_count=2, device_count=2)
        batches[cached, index] = list(got)
    for index in (0, 1):
      assert len(batches[True, index]) == len(batches[False, index]) > 0
      for a, b in zip(batches[True, index], batches[False, index]):
        assert a.keys() == b.keys()
        for k in a:
          np.testing.assert_array_equal(a[k], b[k], err_msg=f'{make.__name__} {k}')
