"""The shipped configs, loaded as the command line loads them, and what they resolve to per task.

``--config=configs/<name>.py`` goes through ml_collections' config-file parser
(``data_fixtures.get_config``), and also through the entry point's own flag parsing with overrides
(``cli_driver``-style: ``dsbn_jax.main.parse_flags``); each sweep task's values come from
``sweep.task_domains`` -> ``catalog.canonical_domain`` -> ``train.resolve_config``, the path a run
takes (the per-task table of Office-31's lr0, the class count from the data).
"""

import json
import os
import subprocess
import sys

import pytest

from dsbn_jax import config_check, sweep, train
from dsbn_jax.datasets import catalog
from dsbn_jax.errors import UserError
from tests import cli_driver
from tests import data_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHIPPED = ("office31", "officehome", "custom", "digits", "smoke")

# Office-31 base learning rate per task (reference train.py __main__: 3e-4 for A->D and D->W).
OFFICE31_LR0 = {
  "amazon->webcam": 1e-3,
  "dslr->webcam": 3e-4,
  "webcam->dslr": 1e-3,
  "amazon->dslr": 3e-4,
  "dslr->amazon": 1e-3,
  "webcam->amazon": 1e-3,
}
OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def _info(num_classes: int, source: str, target: str) -> catalog.DataInfo:
  """What resolve_config reads of the data (names and class count); no dataset is prepared."""
  domain = lambda name: catalog.DomainInfo(name, None, name, name, 1, 1)  # noqa: E731
  return catalog.DataInfo(
    tuple(f"c{i}" for i in range(num_classes)), domain(source), domain(target)
  )


def _resolve(config, task: str, num_classes: int):
  """The config a run of ``task`` ('source->target', any accepted spelling) trains with."""
  source, target = sweep.task_domains(task)
  source = catalog.canonical_domain(config.data, source)
  target = catalog.canonical_domain(config.data, target)
  return train.resolve_config(config, _info(num_classes, source, target))


def _custom_tree(tmp_path, config):
  fx.make_domain_tree(str(tmp_path / "tree"), ("photos", "sketches"), ("a", "b"), per_class=(1,))
  config.data.manual_dir, config.data.data_dir = str(tmp_path / "tree"), str(tmp_path / "tfds")
  config.data.source, config.data.target = "photos", "sketches"


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_config_loads_as_the_command_line_loads_it(name):
  config = fx.get_config(name)
  assert config.is_locked  # lock_config=True, as the entry points: a typo'd override fails
  with pytest.raises(AttributeError):
    config.optim.lr = 0.1  # pylint: disable=attribute-defined-outside-init
  for section in ("model", "optim", "loss", "data", "sweep"):
    assert section in config, section
  assert config.method in ("source_only", "dann", "alda", "alda_dsbn", "dann_dsbn")
  for task in config.sweep.tasks:
    source, target = sweep.task_domains(task)
    assert source != target
  assert len(set(config.sweep.tasks)) == len(config.sweep.tasks)


def test_shipped_configs_load_from_any_directory_without_the_repository_on_the_path(tmp_path):
  """The config files import their defaults from the installed package (no sys.path edits): the
  parser loads each by path from another working directory, with nothing added to sys.path."""
  code = (
    "import sys; from ml_collections.config_flags import config_flags; before = list(sys.path)"
    "; [config_flags.ConfigFileFlagParser(name='config').parse(p) for p in sys.argv[1:]]"
    "; assert sys.path == before, sys.path; assert 'configs' not in sys.modules; print('ok')"
  )
  paths = [os.path.join(ROOT, "configs", f"{name}.py") for name in SHIPPED]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run(
    [sys.executable, "-c", code, *paths],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_office31_lr0_is_resolved_per_task():
  config = fx.get_config("office31")
  assert config.optim.lr0 == 1e-3  # the rate of the tasks without a per-task entry
  assert config.optim.lr0_per_task.to_dict() == {"amazon->dslr": 3e-4, "dslr->webcam": 3e-4}
  assert set(config.sweep.tasks) == set(OFFICE31_LR0)
  for task, lr0 in OFFICE31_LR0.items():
    resolved = _resolve(config, task, 31)
    assert resolved.optim.lr0 == lr0, task
    assert resolved.model.num_classes == 31
    assert not resolved.optim.lr0_per_task  # read once: config.json holds the rate in lr0
  # The abbreviations a user types resolve to the same rates: A->W 0.001, A->D 0.0003, ...
  for task, lr0 in {
    "A->W": 1e-3,
    "A->D": 3e-4,
    "D->W": 3e-4,
    "W->D": 1e-3,
    "D->A": 1e-3,
    "W->A": 1e-3,
    "a->d": 3e-4,
  }.items():
    assert _resolve(config, task, 31).optim.lr0 == lr0, task
  assert config.optim.lr0 == 1e-3 and len(config.optim.lr0_per_task) == 2  # resolved a copy
  assert (config.total_steps, config.batch_size, config.model.backbone) == (20000, 36, "resnet50")
  assert config.model.pretrained_path.endswith("resnet50-19c8e357.pth")
  assert config.data.dataset == "office31" and config.data.crop_size == 224


def test_office31_lr0_through_the_command_line_flags():
  """``--config=configs/office31.py --config.data.source=A --config.data.target=D``: the entry
  point's flag parsing, then the task's resolution."""
  flags = cli_driver.parse(
    "main",
    [
      "main",
      f"--config={ROOT}/configs/office31.py",
      "--config.data.source=A",
      "--config.data.target=D",
    ],
  )
  try:
    config = flags.config
    assert (config.data.source, config.data.target) == ("A", "D")
    assert config.optim.lr0 == 1e-3 and config.is_locked
    config_check.validate(config.copy_and_resolve_references(), for_predict=True)
    resolved = _resolve(config, f"{config.data.source}->{config.data.target}", 31)
    assert resolved.optim.lr0 == 3e-4
  finally:
    flags.unparse_flags()


def _json_before_lr0_per_task(resolved, lr0: float) -> dict:
  """The config.json of an Office-31 A->D run as versions before ``optim.lr0_per_task`` wrote it:
  the table as ``lr0_by_task`` rows and ``lr0_default``, ``lr0`` resolved or the sentinel -1."""
  saved = json.loads(resolved.to_json_best_effort())
  del saved["optim"]["lr0_per_task"]
  saved["optim"].update(
    lr0=lr0, lr0_default=1e-3, lr0_by_task=[["amazon", "dslr", 3e-4], ["dslr", "webcam", 3e-4]]
  )
  return saved


@pytest.mark.parametrize("saved_lr0", [3e-4, -1.0], ids=["resolved", "sentinel"])
def test_a_run_written_with_the_old_per_task_lr0_fields_still_resumes(tmp_path, saved_lr0):
  config = fx.get_config("office31", lock=False)
  config.data.source, config.data.target = "A", "D"
  resolved = _resolve(config, "A->D", 31)
  assert resolved.optim.lr0 == 3e-4
  (tmp_path / "config.json").write_text(json.dumps(_json_before_lr0_per_task(resolved, saved_lr0)))
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a run that trained (train.never_trained)
  train.guard_workdir(str(tmp_path), resolved)  # the run resuming there
  train.guard_workdir(str(tmp_path), config, resolved=False)  # a sweep checking it before runs
  config.optim.lr0_per_task["amazon->dslr"] = 1e-4  # another rate: another configuration
  for candidate, resolved_flag in ((_resolve(config, "A->D", 31), True), (config, False)):
    with pytest.raises(UserError, match=r"optim.lr0: 0.0003 -> 0.0001"):
      train.guard_workdir(str(tmp_path), candidate, resolved=resolved_flag)


def test_officehome_every_task_is_lr0_1e3_over_the_four_domains():
  config = fx.get_config("officehome")
  assert len(config.sweep.tasks) == 12
  for task in config.sweep.tasks:
    source, target = sweep.task_domains(task)
    assert source in OFFICE_HOME_DOMAINS and target in OFFICE_HOME_DOMAINS
    resolved = _resolve(config, task, 65)
    assert resolved.optim.lr0 == 1e-3 and resolved.model.num_classes == 65, task
  assert _resolve(config, "Ar->Rw", 65).optim.lr0 == 1e-3  # abbreviations, spaces
  assert _resolve(config, "Real World->Art", 65).optim.lr0 == 1e-3
  assert (config.total_steps, config.data.dataset, config.data.crop_size) == (
    10000,
    "office_home",
    224,
  )


def test_custom_takes_officehome_recipe_on_a_tree(tmp_path):
  config = fx.get_config("custom")
  home = fx.get_config("officehome")
  assert config.sweep.tasks == () and config.data.dataset == "custom"
  for field in ("total_steps", "batch_size", "method"):
    assert config[field] == home[field], field
  assert config.optim.to_dict() == home.optim.to_dict()
  assert config.model.to_dict() == home.model.to_dict()
  _custom_tree(tmp_path, config)
  resolved = _resolve(config, "Photos->SKETCHES", 2)  # any case: the tree's folder names
  assert resolved.optim.lr0 == 1e-3 and resolved.model.num_classes == 2
  assert not (tmp_path / "tfds" / "domain_folder").exists()  # resolving names prepares nothing


@pytest.mark.parametrize("name", ["digits", "smoke"])
def test_digits_and_smoke_resolve_their_one_task(name):
  config = fx.get_config(name)
  assert tuple(config.sweep.tasks) == ("digits->digits_m",)
  resolved = _resolve(config, config.sweep.tasks[0], 10)
  assert resolved.optim.lr0 == 0.01 and resolved.model.num_classes == 10
  assert _resolve(config, "d->dm", 10).optim.lr0 == 0.01
  assert resolved.model.backbone == "small_cnn" and resolved.data.crop_size == 0
  if name == "smoke":  # a few steps of the digits run, sized for any device count up to 8
    assert (config.total_steps, config.batch_size, config.data.eval_batch_size) == (6, 8, 64)
    assert config.eval_every_steps == config.checkpoint_every_steps == 3
