"""From a data config (``config_defaults.get_data_config``) to prepared TFDS builders, classes."""

from __future__ import annotations

import dataclasses
import os
import sys

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from dsbn_jax import cli
from dsbn_jax.datasets import custom, folder, office, prepared
from dsbn_jax.datasets import digits as digits_lib
from dsbn_jax.errors import UserError

DATASETS = ('digits', 'office31', 'office_home', 'custom')
# Short names used in the papers' task tables (A->W, Ar->Cl, ...), accepted as domain names.
_ABBREVIATIONS = {
  'office31': {'a': 'amazon', 'd': 'dslr', 'w': 'webcam'},
  'office_home': {'ar': 'Art', 'cl': 'Clipart', 'pr': 'Product', 'rw': 'Real_World'},
  'digits': {'d': 'digits', 'dm': 'digits_m'},
}


def hide_accelerators_from_tf() -> None:
  """Keeps TensorFlow on the CPU so it never grabs GPU/TPU memory meant for JAX.

  The install uses tensorflow-cpu, but a user's environment may hold a full TensorFlow: hiding its
  accelerators before it initialises them is what keeps it off the device (TF would otherwise
  reserve most of a GPU's memory on its first op).
  """
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # TF already initialised, or no such device type
      if tf.config.get_visible_devices(kind):
        logging.warning(
          'TensorFlow was initialised with a visible %s before the input pipeline was'
          ' built; call dsbn_jax.datasets.catalog.hide_accelerators_from_tf() '
          'earlier',
          kind,
        )


@dataclasses.dataclass(frozen=True)
class DomainInfo:
  """One domain: its builder, the splits used for training and evaluation, and their sizes."""

  name: str  # canonical domain name, e.g. 'Real_World' or 'digits_m'
  builder: tfds.core.DatasetBuilder
  train_split: str  # split the train stream reads (the whole domain for Office, as the reference)
  eval_split: str  # split evaluated on (the same for Office: transductive, docs/reference.md §6)
  num_train: int  # examples in train_split, all processes together
  num_eval: int  # examples in eval_split, all processes together


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model and the train loop need to know about the data."""

  class_names: tuple[str, ...]
  source: DomainInfo
  target: DomainInfo
  # The content digest of a custom tree (custom.digest): a run records it (config.data.
  # dataset_digest) and never resumes on other content. '' for the built-in datasets.
  digest: str = ''

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _check_dataset(data: ml_collections.ConfigDict) -> str:
  if data.dataset not in DATASETS:
    raise UserError(
      f'unknown dataset {data.dataset!r} (config field data.dataset); valid: {list(DATASETS)}'
    )
  return data.dataset


def _path(p: str | None) -> str | None:
  return os.path.abspath(os.path.expanduser(p)) if p else None


def valid_domains(data: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Canonical domain names of the configured dataset."""
  kind = _check_dataset(data)
  if kind == 'digits':
    return ('digits', 'digits_m')
  if kind == 'custom':  # the tree's domains (or, when it is gone, its prepared copy's)
    return tuple(_custom_builder(data)._domains())  # pylint: disable=protected-access
  return tuple({'office31': office.Office31, 'office_home': office.OfficeHome}[kind].DOMAINS)


def canonical_domain(data: ml_collections.ConfigDict, name: str) -> str:
  """Resolves spaces ("Real World"), case and abbreviations ("Rw"); else lists the valid ones.

  An exact name wins; another case only if one domain matches it (a custom tree may hold both
  ``Src`` and ``src``: ``SRC`` is then an error naming both, never one of them silently).
  """
  valid = valid_domains(data)
  exact = folder.split_name(str(name))
  if exact in valid:
    return exact
  key = exact.lower()
  matches = [v for v in valid if v.lower() == key]
  if len(matches) > 1:
    raise UserError(
      f'domain {name!r} is ambiguous for dataset {data.dataset}: it matches '
      f'{matches}, which differ only by case; give the exact name'
    )
  if matches:
    return matches[0]
  abbreviations = _ABBREVIATIONS.get(data.dataset, {})
  if key in abbreviations:
    return abbreviations[key]
  raise UserError(f'unknown domain {name!r} for dataset {data.dataset}; valid: {list(valid)}')


def _data_root(data: ml_collections.ConfigDict) -> str:
  return _path(data.data_dir) or os.path.expanduser(tfds.core.constants.DATA_DIR)


def _custom_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  if not data.manual_dir:
    raise UserError('data.dataset=custom needs data.manual_dir: a root/<domain>/<class>/ tree')
  name = data.custom_name or folder.split_name(os.path.basename(_path(data.manual_dir)))
  return custom.make_builder(_path(data.manual_dir), _data_root(data), name.lower())


def _prepare(builder: tfds.core.DatasetBuilder, data: ml_collections.ConfigDict) -> None:
  """Prepares ``builder`` (under its exclusive lock, prepared.ensure_prepared). A full disk is one
  line naming the file (in the data_dir) that filled it."""
  if isinstance(builder, custom.DomainFolder):
    custom.say_change(builder)
  if not sys.stderr.isatty():  # in a log file TFDS's bars print a line per archive member
    tfds.disable_progress_bar()
  print(
    f'preparing the {builder.name} dataset in {builder.data_dir} (once; a full Office set '
    'takes minutes)',
    file=sys.stderr,
    flush=True,
  )
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=_path(data.manual_dir))
    )
  except Exception as e:  # pylint: disable=broad-except  (only a full disk is answered here)
    if isinstance(e, UserError) or cli.disk_full(e) is None:
      raise
    raise UserError(
      cli.disk_full_message(
        e,
        where=os.fspath(builder.data_dir_root),
        resume='run the same command again (the dataset is prepared from the start)',
      )
    ) from None


def get_builder(
  data: ml_collections.ConfigDict, domain: str, *, prepare: bool = True
) -> tfds.core.DatasetBuilder:
  """The TFDS builder holding `domain`, prepared first if `prepare` (one process prepares it, the
  others wait and reuse it; inside ``prepared.reading()`` it is never deleted while read)."""
  hide_accelerators_from_tf()
  kind = _check_dataset(data)
  if kind == 'custom':
    make = lambda: _custom_builder(data)
  else:
    name = canonical_domain(data, domain) if kind == 'digits' else kind
    config = (
      digits_lib.DigitsConfig(name=f'seed{data.digits_seed}', seed=data.digits_seed)
      if (kind == 'digits' and data.digits_seed)
      else None
    )
    make = lambda: tfds.builder(name, config=config, data_dir=_path(data.data_dir))
  if not prepare:
    return make()
  builder = prepared.ensure_prepared(make, lambda b: _prepare(b, data))
  if kind == 'custom':
    custom.delete_outdated(builder)
  return builder


def resolve_domain(data: ml_collections.ConfigDict, domain: str) -> DomainInfo:
  """Builder (prepared), splits and sizes of one domain of the configured dataset."""
  name = canonical_domain(data, domain)
  builder = get_builder(data, name)
  train, test = ('train', 'test') if data.dataset == 'digits' else (name, name)
  splits = builder.info.splits
  if data.get('eval_split'):
    if data.eval_split not in splits:
      raise UserError(
        f'data.eval_split={data.eval_split!r} is not a split of {name!r}; valid: '
        f"{sorted(splits)} or '' (the protocol's split)"
      )
    test = data.eval_split
  return DomainInfo(
    name=name,
    builder=builder,
    train_split=train,
    eval_split=test,
    num_train=splits[train].num_examples,
    num_eval=splits[test].num_examples,
  )


def get_data_info(data: ml_collections.ConfigDict) -> DataInfo:
  """Class names and both domains of a data config; prepares the datasets if needed."""
  source, target = resolve_domain(data, data.source), resolve_domain(data, data.target)
  names = [tuple(d.builder.info.features['label'].names) for d in (source, target)]
  if names[0] != names[1]:
    raise UserError(
      f'source {source.name} and target {target.name} have different classes: '
      f'{sorted(set(names[0]) ^ set(names[1]))}'
    )
  digest = custom.digest(source.builder) if data.dataset == 'custom' else ''
  return DataInfo(class_names=names[0], source=source, target=target, digest=digest)
