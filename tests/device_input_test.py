"""The train augmentation on the devices (data.train_input 'device' and 'resident') against the
host path: the same rows, labels, boxes and flips, pixels within one level; how 'auto' resolves;
the config checks; and a whole run."""

import json

import jax
import numpy as np
import pytest

from dsbn_jax import config_check, device_augment
from dsbn_jax import input_pipeline as ip
from dsbn_jax.datasets import catalog
from dsbn_jax.errors import UserError
from tests import cli_driver
from tests import data_fixtures as fx


@pytest.fixture(scope='module')
def office(tmp_path_factory):
  """A generated Office-Home tree (Art -> Real World) at 40 px, RandomResizedCrop 32 and flips."""
  tmp = tmp_path_factory.mktemp('device_input')
  fx.make_domain_tree(
    str(tmp / 'manual'), fx.OFFICE_HOME_DOMAINS, fx.OFFICE_HOME_SUBSET, per_class=(1, 2, 3, 2)
  )
  data = fx.get_data_config('office_home')
  data.data_dir, data.manual_dir = str(tmp / 'tfds'), str(tmp / 'manual')
  data.source, data.target = 'Art', 'Real World'
  data.resize_size, data.crop_size = 40, 32
  assert data.random_flip
  catalog.get_data_info(data)
  return data


def _batches(data, train_input, steps, batch=4, devices=3, start=0):
  it = ip.make_train_iterator(
    data,
    global_batch_size=batch,
    seed=5,
    start_step=start,
    process_index=0,
    process_count=1,
    device_count=devices,
    train_input=train_input,
  )
  return [next(it) for _ in range(steps)]


def test_device_batches_equal_the_host_path(office):
  """Over an epoch boundary (11 Art images, 4 per step) and with padding (4 rows on 3 devices: 6
  rows): the device paths give the host path's labels, masks and pixels exactly, except one level
  (1/255) where a resize sum lands within a rounding step of a half (tests/device_augment_test.py);
  padding zero; 'device' and 'resident' give the same arrays bit for bit."""
  steps = 4
  host = _batches(office, 'host', steps)
  rows = _batches(office, 'device', steps)
  resident = _batches(office, 'resident', steps)
  images = ip.resident_images(office)
  augment = jax.jit(lambda batch, images: device_augment.train_batch(batch, office, images))
  level = 1 / 255 / min(office.std)  # one uint8 level after normalisation, at most
  flipped = boxes = 0
  for h, d, r in zip(host, rows, resident):
    got_d, got_r = augment(d, None), augment(r, images)
    for name in ('source', 'target'):
      np.testing.assert_array_equal(got_d[name]['image'], got_r[name]['image'])
      assert d[name]['image'].dtype == np.uint8 and d[name]['image'].shape == (6, 40, 40, 3)
      assert r[name]['row'].shape == (6,) and 'image' not in r[name]
      for key in ('label', 'mask'):
        np.testing.assert_array_equal(got_d[name][key], h[name][key])
      np.testing.assert_array_equal(d[name]['box'], r[name]['box'])
      diff = np.abs(np.asarray(got_d[name]['image']) - h[name]['image'])
      assert diff.max() <= level + 1e-6, diff.max()
      assert np.mean(diff > 0) < 0.01  # the rest equal to the bit (normalization_table)
      assert not np.any(np.asarray(got_d[name]['image'])[4:])  # the padding rows: zero
      flipped += int(d[name]['flip'][:4].sum())
      boxes += len({tuple(b) for b in d[name]['box'][:4]})
  assert 0 < flipped < 2 * 4 * steps and boxes > 2 * steps  # flips and boxes of several sizes


def test_device_input_resumes_mid_stream(office):
  """``start_step`` gives the uninterrupted stream's rows and draws (the resume contract)."""
  whole = _batches(office, 'resident', 3)
  resumed = _batches(office, 'resident', 1, start=2)
  for key in ('row', 'box', 'flip', 'label', 'mask'):
    np.testing.assert_array_equal(resumed[0]['target'][key], whole[2]['target'][key])


def _data(**overrides):
  data = fx.get_data_config('office_home')
  data.update(overrides)
  return data


def test_auto_resolves_by_platform_and_size():
  resolve = device_augment.resolve_train_input
  per_image = 256 * 256 * 3
  assert resolve(_data(), 'cpu', 10_000) == 'host'  # the host is the device: nothing gained
  assert resolve(_data(), 'gpu', 8_796) == 'resident'  # Office-Home Product + Real World
  assert resolve(_data(resident_max_gb=1.0), 'gpu', 2**30 // per_image + 1) == 'device'
  assert resolve(_data(train_sharding='process'), 'tpu', 10) == 'device'
  assert resolve(_data(cache_resized=False), 'gpu', 10) == 'host'
  for forced in ('host', 'device', 'resident'):
    assert resolve(_data(train_input=forced), 'cpu', 10) == forced


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'train_input': 'gpu'}, "invalid config.data.train_input='gpu'"),
    ({'train_input': 'device', 'cache_resized': False}, 'data.cache_resized=False'),
    ({'train_input': 'resident', 'train_sharding': 'process'}, "train_sharding='process'"),
    ({'resident_max_gb': -1.0}, 'invalid config.data.resident_max_gb=-1.0'),
  ],
)
def test_bad_train_input_is_refused_by_the_config_check(overrides, message):
  config = fx.get_config('smoke', lock=False)
  config.method = 'alda'
  config.data.update(overrides)
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')) as e:
    config_check.validate(config)
  assert '\n' not in str(e.value)


def _train_rows(workdir):
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if k.startswith('train/') and k != 'train/images_per_s'}
    for r in rows
    if 'train/loss' in r
  ]


def test_a_resident_run_on_three_devices_trains_as_the_host_path(
  tmp_path, digits_data_dir, smoke_run
):
  """configs/smoke.py with its domains resident on 3 devices (8 rows per domain: padded to 9)
  gives the metrics of the session's smoke run (host input, one device) at every step: no crop at
  32 px, so the device path's pixels are the host path's to the bit (a normalisation one float
  step off moved train/ce by 4e-5 at step 3)."""
  workdir = tmp_path / 'resident'
  result = cli_driver.run_main(
    workdir,
    digits_data_dir,
    '--config.data.train_input=resident',
    '--config.total_steps=3',
    devices=3,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resized images are held on every device" in result.stdout
  got, want = _train_rows(workdir), _train_rows(smoke_run[0])[:3]
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  for g, w in zip(got, want):
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize('eval_mode,crop', [('10crop', 32), ('center', 32), ('center', 0)])
def test_eval_crops_on_the_device_equal_the_host_crops(office, eval_mode, crop):
  """The cached uint8 resize cropped and normalised by the eval step's ``eval_images`` gives the
  host crops bit for bit, padding included (3 devices: the last batch is padded)."""
  data = office.copy_and_resolve_references()
  data.eval_mode, data.crop_size = eval_mode, crop
  kw = dict(global_batch_size=4, process_index=0, process_count=1, device_count=3)
  host = list(ip.make_eval_data(data, **kw))
  resized = list(ip.make_eval_data(data, crops_on_device=True, **kw))
  assert len(host) == len(resized) and not resized[-1]['mask'].all()
  crop_fn = jax.jit(lambda images: device_augment.eval_images(images, data))
  for h, r in zip(host, resized):
    assert r['image'].dtype == np.uint8 and r['image'].shape[1:] == (40, 40, 3)
    got = np.asarray(crop_fn(r['image']))
    real = r['mask']
    np.testing.assert_array_equal(got[real], h['image'][real])
    np.testing.assert_array_equal(r['label'], h['label'])
    np.testing.assert_array_equal(r['mask'], h['mask'])


def test_packed_draws_give_the_same_batches(office):
  """``device_augment.pack`` (one int32 array of draws per domain, what the loop sends) gives the
  step the batches of the unpacked form, bit for bit, for 'device' and 'resident'."""
  images = ip.resident_images(office)
  augment = jax.jit(lambda batch, images: device_augment.train_batch(batch, office, images))
  for train_input in ('device', 'resident'):
    batch = _batches(office, train_input, 1)[0]
    packed = device_augment.pack(batch)
    assert set(packed['source']) == {'draws'} | ({'image'} if train_input == 'device' else set())
    assert packed['source']['draws'].shape == (6, len(device_augment.DRAWS))
    got, want = augment(packed, images), augment(batch, images)
    for name in ('source', 'target'):
      for key in ('image', 'label', 'mask'):
        np.testing.assert_array_equal(got[name][key], want[name][key])
