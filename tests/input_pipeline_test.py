"""tf.data pipelines: batch contract, reference transforms (torchvision/PIL), eval, resume."""

import hashlib
import io
from unittest import mock

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
import torch
from scipy import stats
from torchvision import transforms
from torchvision.transforms import functional as TF

from dsbn_jax import input_pipeline as ip
from dsbn_jax.datasets import catalog
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx


@pytest.fixture(scope='module')
def office_home(tmp_path_factory):
  """Data config of a generated Office-Home tree (Art -> Real_World), prepared once."""
  tmp = tmp_path_factory.mktemp('pipeline')
  # 11 (Art), 13, 13, 11 (Real World) images: odd counts exercise uneven process splits.
  fx.make_domain_tree(
    str(tmp / 'manual'), fx.OFFICE_HOME_DOMAINS, fx.OFFICE_HOME_SUBSET, per_class=(1, 2, 3, 2)
  )
  data = fx.get_data_config('office_home')
  data.data_dir, data.manual_dir = str(tmp / 'tfds'), str(tmp / 'manual')
  data.source, data.target = 'Art', 'Real World'
  catalog.get_data_info(data)  # builds the dataset
  return data


def _config(base, **overrides):
  data = base.copy_and_resolve_references()
  data.update(overrides)
  return data


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _train(data, start_step=0, seed=0, batch=4, index=0, count=1):
  return ip.make_train_iterator(
    data,
    global_batch_size=batch,
    seed=seed,
    start_step=start_step,
    process_index=index,
    process_count=count,
  )


def _assert_batches_equal(a, b):
  for x, y in zip(a, b):
    for domain in ('source', 'target'):
      for key in ('image', 'label'):
        np.testing.assert_array_equal(x[domain][key], y[domain][key])


def _normalised_range(data):
  mean, std = np.array(data.mean), np.array(data.std)
  return (0 - mean) / std, (1 - mean) / std


# ---------------------------------------------------------------------------------------------
# Batch contract
# ---------------------------------------------------------------------------------------------


def test_train_batches_follow_the_contract(office_home):
  info = catalog.get_data_info(office_home)
  batches = _take(_train(office_home, batch=4), 3)
  lo, hi = _normalised_range(office_home)
  for batch in batches:
    assert set(batch) == {'source', 'target'}
    for domain in batch.values():
      assert set(domain) == {'image', 'label', 'mask'} and domain['mask'].all()  # 1 device
      assert domain['image'].shape == (4, 224, 224, 3) and domain['image'].dtype == np.float32
      assert domain['label'].shape == (4,) and domain['label'].dtype == np.int32
      assert np.all((domain['label'] >= 0) & (domain['label'] < info.num_classes))
      assert np.all(domain['image'] >= lo - 1e-5) and np.all(domain['image'] <= hi + 1e-5)
      assert domain['image'].std() > 0.1  # real pixels, not padding
  labels = np.concatenate([b['source']['label'] for b in batches])
  names = {info.class_names[l] for l in labels}
  assert names <= set(fx.OFFICE_HOME_SUBSET) and len(names) > 1


@pytest.mark.parametrize('mode, shape', [('10crop', (10, 224, 224, 3)), ('center', (224, 224, 3))])
def test_eval_batches_follow_the_contract(office_home, mode, shape):
  data = _config(office_home, eval_mode=mode)
  batches = list(ip.make_eval_data(data, global_batch_size=5, process_index=0, process_count=1))
  lo, hi = _normalised_range(data)
  for b in batches:
    assert set(b) == {'image', 'label', 'mask'}
    assert b['image'].shape == (5,) + shape and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and b['mask'].dtype == np.bool_
    real = b['image'][b['mask']]
    assert np.all(real >= lo.reshape(-1) - 1e-5) and np.all(real <= hi.reshape(-1) + 1e-5)
    assert np.all(b['image'][~b['mask']] == 0)  # padding


def test_digits_pipeline_is_32px_without_crop(digits_data_dir):
  data = fx.get_data_config('digits')
  data.data_dir = digits_data_dir
  batch = next(_train(data, batch=8))
  for domain in batch.values():
    assert domain['image'].shape == (8, 32, 32, 3) and domain['image'].dtype == np.float32
    assert domain['image'].min() >= -1 and domain['image'].max() <= 1  # mean/std 0.5
  evaluation = ip.make_eval_data(data, process_index=0, process_count=1)
  first = next(iter(evaluation))
  assert first['image'].shape == (data.eval_batch_size, 32, 32, 3)
  info = catalog.get_data_info(data)
  assert evaluation.num_examples == info.target.num_eval and info.target.eval_split == 'test'
  assert info.class_names == tuple(str(d) for d in range(10))


def test_tensorflow_is_told_to_hide_accelerators(office_home):
  with mock.patch.object(tf.config, 'set_visible_devices') as hide:
    ip.make_train_dataset(
      office_home, global_batch_size=4, seed=0, process_index=0, process_count=1
    )
  hide.assert_any_call([], 'GPU')


def test_bad_pipeline_settings_are_user_errors(office_home):
  with pytest.raises(UserError, match='must be positive'):  # any other size runs (padded)
    _train(office_home, batch=0, count=2)
  with pytest.raises(UserError, match='fewer than one batch'):
    _train(office_home, batch=64)
  with pytest.raises(UserError, match='eval_mode'):
    ip.make_eval_data(_config(office_home, eval_mode='5crop'), process_index=0, process_count=1)


# ---------------------------------------------------------------------------------------------
# Determinism, resume and multi-process layout of the train stream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('sharding', ['global', 'process'])
def test_resume_at_step_yields_the_uninterrupted_batches(office_home, sharding):
  # 11 images per domain, global batch 4: 2 steps per epoch, so steps 0..7 span four epochs.
  data = _config(
    office_home, train_sharding=sharding, crop_size=32, resize_size=40, eval_mode='center'
  )
  count = 2 if sharding == 'process' else 1
  uninterrupted = _take(_train(data, count=count), 8)
  resumed = _take(_train(data, start_step=5, count=count), 3)
  _assert_batches_equal(resumed, uninterrupted[5:])
  other_seed = _take(_train(data, seed=1, count=count), 8)
  assert any(
    not np.array_equal(a['source']['image'], b['source']['image'])
    for a, b in zip(uninterrupted, other_seed)
  )


def test_each_epoch_is_a_permutation_of_the_domain(office_home):
  data = _config(office_home, crop_size=32, resize_size=40, eval_mode='center')
  info = catalog.get_data_info(data)
  n = catalog.get_data_info(data).target.num_train
  labels = np.concatenate([b['target']['label'] for b in _take(_train(data, batch=n), 2)])
  per_epoch = labels.reshape(2, n)  # batch = domain size: one step per epoch
  all_labels = sorted(int(ex['label']) for ex in info.target.builder.as_dataset(split='Real_World'))
  for epoch in per_epoch:
    assert sorted(epoch) == all_labels
  assert not np.array_equal(per_epoch[0], per_epoch[1])  # reshuffled each epoch


def test_global_stream_does_not_depend_on_the_process_count(office_home):
  data = _config(office_home, crop_size=32, resize_size=40, eval_mode='center')
  single = _take(_train(data, batch=4), 4)
  parts = [_take(_train(data, batch=4, index=p, count=2), 4) for p in range(2)]
  for step, whole in enumerate(single):
    for domain in ('source', 'target'):
      for key in ('image', 'label'):
        rows = [parts[p][step][domain][key] for p in range(2)]
        assert rows[0].shape[0] == 2
        np.testing.assert_array_equal(np.concatenate(rows), whole[domain][key])


@pytest.mark.parametrize('dataset', ['office_home', 'digits'])
def test_cache_resized_off_gives_the_same_train_batches(office_home, digits_data_dir, dataset):
  """data.cache_resized=False (decode and resize every image every time it is read) yields the
  batches of the default True (each image decoded and resized once): Office's crop of 224 with
  flips, and the digits' 32 px without crop; over two epochs (Office), from step 0 and resumed."""
  if dataset == 'office_home':
    data, batch = _config(office_home), 4
  else:
    data, batch = fx.get_data_config('digits'), 8
    data.data_dir = digits_data_dir
  assert data.cache_resized is True  # the default
  cached = _take(_train(data, batch=batch), 4)
  uncached = _take(_train(_config(data, cache_resized=False), batch=batch), 4)
  _assert_batches_equal(uncached, cached)
  resumed = _take(_train(_config(data, cache_resized=False), batch=batch, start_step=3), 1)
  _assert_batches_equal(resumed, cached[3:])


# ---------------------------------------------------------------------------------------------
# Eval coverage: every image exactly once, also across processes
# ---------------------------------------------------------------------------------------------


def _masked_images(evaluation):
  """Sorted (label, pixel hash) of the real images, and the number of batches."""
  seen, n = [], 0
  for b in evaluation:
    n += 1
    for image, label in zip(b['image'][b['mask']], b['label'][b['mask']]):
      seen.append((int(label), hashlib.sha1(np.round(image, 4).tobytes()).hexdigest()))
  return sorted(seen), n


@pytest.mark.parametrize('batch', [4, 6, 22])
def test_every_eval_image_counts_once_across_processes(office_home, batch):
  data = _config(office_home, eval_mode='center', crop_size=32, resize_size=40)
  info = catalog.get_data_info(data)
  target = info.target.builder.as_dataset(split='Real_World')
  expected_labels = sorted(int(ex['label']) for ex in target)
  single, n_single = _masked_images(
    ip.make_eval_data(data, global_batch_size=batch, process_index=0, process_count=1)
  )
  assert [label for label, _ in single] == expected_labels and len(set(single)) == len(single)
  assert n_single == -(-len(expected_labels) // batch)
  per_process = [
    ip.make_eval_data(data, global_batch_size=batch, process_index=p, process_count=2)
    for p in range(2)
  ]
  results = [_masked_images(e) for e in per_process]
  assert results[0][1] == results[1][1] == per_process[0].num_batches  # same batch count everywhere
  assert sorted(results[0][0] + results[1][0]) == single
  assert per_process[0].num_examples == len(expected_labels)


def test_more_processes_than_eval_images_still_count_each_once(office_home):
  data = _config(office_home, eval_mode='center', crop_size=32, resize_size=40)
  n = catalog.get_data_info(data).target.num_eval
  count = n + 1  # the last process gets no image at all, only padding
  results = [
    _masked_images(
      ip.make_eval_data(data, global_batch_size=count, process_index=p, process_count=count)
    )
    for p in range(count)
  ]
  assert [batches for _, batches in results] == [1] * count
  assert [len(seen) for seen, _ in results] == [1] * n + [0]


# ---------------------------------------------------------------------------------------------
# Parity with the reference transforms (ALDA pre_process.py, re-stated with PIL/torchvision)
# ---------------------------------------------------------------------------------------------


class _ResizeImage:  # the reference's ResizeImage: PIL resize to a square, default filter
  def __call__(self, img):
    return img.resize((256, 256))


class _PlaceCrop:  # the reference's PlaceCrop: PIL crop of box (x, y, x + 224, y + 224)
  def __init__(self, x, y):
    self.x, self.y = x, y

  def __call__(self, img):
    return img.crop((self.x, self.y, self.x + 224, self.y + 224))


def _reference_ten_crop(img):
  """image_test_10crop: origins first=0, last=31, center=15.5 (PIL rounds); flipped crops first."""
  first, last, center = 0, 256 - 224 - 1, (256 - 224 - 1) / 2
  origins = [(first, first), (last, last), (last, first), (first, last), (center, center)]
  normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
  crops = []
  for flip in (True, False):
    for x, y in origins:
      force_flip = [lambda im: im.transpose(PIL.Image.FLIP_LEFT_RIGHT)] if flip else []
      steps = [_ResizeImage()] + force_flip
      pipeline = transforms.Compose(steps + [_PlaceCrop(x, y), transforms.ToTensor(), normalize])
      crops.append(pipeline(img).permute(1, 2, 0).numpy())
  return np.stack(crops)


def _preprocess_eval(data, encoded):
  return ip.preprocess_eval(tf.constant(encoded), data).numpy()


def test_ten_crop_equals_the_reference_boxes_on_a_known_image(office_home):
  rng = np.random.default_rng(0)
  known = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)  # noise: any box shift shows
  encoded = fx.encode(known, 'RGB', 'PNG')
  ours = _preprocess_eval(office_home, encoded)
  reference = _reference_ten_crop(PIL.Image.open(io.BytesIO(encoded)).convert('RGB'))
  assert ours.shape == reference.shape == (10, 224, 224, 3)
  np.testing.assert_allclose(ours, reference, atol=1e-5)
  center = _preprocess_eval(_config(office_home, eval_mode='center'), encoded)
  np.testing.assert_allclose(center, reference[9], atol=1e-5)  # image_test = unflipped center crop


def test_ten_crop_after_a_real_resize_is_close_to_the_reference(office_home):
  encoded = fx.encode(fx.random_image(5, (500, 375)), 'RGB', 'JPEG')
  ours = _preprocess_eval(office_home, encoded)
  reference = _reference_ten_crop(PIL.Image.open(io.BytesIO(encoded)).convert('RGB'))
  diff = np.abs(ours - reference) * 0.229 * 255  # in uint8 levels (roughly)
  assert diff.max() <= 4 and diff.mean() < 0.5  # TF vs PIL bicubic rounding, not a shifted box


def test_random_resized_crop_box_fallback_equals_torchvision():
  for height, width in ((1000, 10), (10, 1000), (5, 6)):
    ours = [
      int(v)
      for v in ip.random_resized_crop_boxes(
        tf.constant([1, 2], tf.int64), 1, height, width, (0.08, 1.0), (3 / 4, 4 / 3)
      )[0]
    ]
    image = torch.zeros(1, height, width)
    if (height, width) == (5, 6):  # small enough that attempts can succeed: compare validity only
      top, left, h, w = ours
      assert 0 <= top <= height - h and 0 <= left <= width - w
      continue
    assert ours == list(transforms.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3)))


def test_random_resized_crop_box_distribution_matches_torchvision():
  n = 3000
  seed = tf.constant([7, 0], tf.int64)
  ours = ip.random_resized_crop_boxes(seed, n, 256, 256, (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
  torch.manual_seed(0)
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # get_params makes tiny tensors: thread start-up dominates otherwise
  try:
    theirs = np.array(
      [
        transforms.RandomResizedCrop.get_params(
          torch.zeros(1, 256, 256), (0.08, 1.0), (3 / 4, 4 / 3)
        )
        for _ in range(n)
      ]
    )
  finally:
    torch.set_num_threads(threads)
  for name, f in (
    ('area', lambda b: b[:, 2] * b[:, 3] / 256**2),
    ('aspect', lambda b: b[:, 3] / b[:, 2]),
    ('top', lambda b: b[:, 0]),
    ('center_x', lambda b: b[:, 1] + b[:, 3] / 2),
  ):
    assert stats.ks_2samp(f(ours), f(theirs)).pvalue > 1e-3, name
  assert np.all(ours[:, 0] + ours[:, 2] <= 256) and np.all(ours[:, 1] + ours[:, 3] <= 256)


def test_train_crop_pixels_match_torchvision_resized_crop(office_home):
  data = _config(office_home, random_flip=False)
  encoded = fx.encode(fx.random_image(9, (256, 256)), 'RGB', 'PNG')
  seed = tf.constant([3, 4], tf.int64)
  ours = ip.preprocess_train(tf.constant(encoded), seed, data).numpy()
  top, left, h, w = [int(v) for v in ip.train_draws(seed, 1, 256, data)[0][0]]  # its box
  img = PIL.Image.open(io.BytesIO(encoded)).convert('RGB')
  ref = TF.resized_crop(img, top, left, h, w, [224, 224], transforms.InterpolationMode.BILINEAR)
  ref = (np.asarray(ref) / 255.0 - np.array(data.mean)) / np.array(data.std)
  diff = np.abs(ours - ref) * 0.229 * 255
  assert diff.max() <= 2 and diff.mean() < 0.3


def test_train_flip_is_a_fair_coin(office_home):
  data = _config(office_home, crop_size=0, resize_size=8)
  encoded = fx.encode(fx.random_image(2, (8, 8)), 'RGB', 'PNG')
  plain = ip.preprocess_eval(tf.constant(encoded), _config(data, eval_mode='center')).numpy()
  flips = [
    not np.allclose(
      ip.preprocess_train(tf.constant(encoded), tf.constant([0, i], tf.int64), data).numpy(), plain
    )
    for i in range(400)
  ]
  assert 0.42 < np.mean(flips) < 0.58


def test_every_data_config_field_is_commented():
  path = fx.os.path.join(
    fx.os.path.dirname(fx.os.path.dirname(fx.__file__)), 'dsbn_jax', 'config_defaults.py'
  )
  with open(path) as f:
    lines = [l.strip() for l in f]
  for name in ('digits', 'office31', 'office_home', 'custom'):
    data = fx.get_data_config(name)
    assert data.dataset == name
    for field in data:
      at = next(i for i, l in enumerate(lines) if l.startswith(f'data.{field} ='))
      assert '#' in lines[at] or lines[at - 1].startswith('#'), field  # inline or just above
