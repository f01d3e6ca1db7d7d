"""One validation of the whole config before a workdir is touched (issue 12): the bad-input matrix.

Every enumerated field with a bad value, range errors, batch divisibility and missing paths are
given to ``dsbn_jax.main`` with a new workdir and with a finished run's workdir, to
``dsbn_jax.sweep`` with a new and an existing sweep root, and to ``dsbn_jax.predict`` on a finished
workdir whose ``config.json`` was edited. Asserted for each: exit status 2; one ``error: ...`` line
naming the field, the value and the valid choices; no traceback; the new workdir does not exist;
every file of the existing one keeps its bytes (and no file is added).

The commands run as users type them, minus the process start: each case's argv is parsed with
the entry point's absl flags and its ``main`` called (tests/cli_driver.py), one case after another
in this process, on a mesh of ``DEVICES`` CPU devices (the host a user with 2 devices has).
"""

import hashlib
import importlib
import json
import os
import shutil

import pytest

from tests import cli_driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 2  # the drivers' device count (any batch size runs on it: tests/any_batch_test.py)

# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _snapshot(root: str) -> dict:
  """Relative path -> sha256 of every file under ``root`` ({} when it does not exist)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _drive(entry: str, cases: list) -> dict:
  """Runs ``dsbn_jax.<entry>.main`` on every case (id, argv, and the "new" workdir that must not
  appear or the "existing" one that must not change); returns what each did."""
  results = {}
  with cli_driver.mesh_of(DEVICES):
    for case in cases:
      existing = case.get("existing")
      before = _snapshot(existing) if existing else None
      result = cli_driver.run(entry, case["argv"])
      after = _snapshot(existing) if existing else None
      results[case["id"]] = {
        "rc": result.returncode,
        "stderr": result.stderr,
        "new_exists": os.path.exists(case["new"]) if case.get("new") else None,
        "existing_changed": None
        if existing is None
        else sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)),
      }
  return results


# --------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------

import jax  # noqa: E402
import ml_collections  # noqa: E402

from configs import smoke  # noqa: E402
from dsbn_jax import config_check, input_pipeline, methods, optim, sharding, validators  # noqa: E402
from dsbn_jax.config_defaults import get_config as default_config  # noqa: E402
from dsbn_jax.datasets import catalog  # noqa: E402
from dsbn_jax.errors import UserError  # noqa: E402
from dsbn_jax.models import heads  # noqa: E402

_SMOKE = smoke.get_config()

# (field, bad value, the valid choices the message must list)
ENUMS = [
  ("method", "alda_dsnb", tuple(methods.METHODS)),
  ("model.backbone", "resnet51", heads.BACKBONES),
  ("model.dtype", "bf16", heads.DTYPES),
  ("model.matmul_precision", "fast", config_check.MATMUL_PRECISIONS),
  ("model.conv_impl", "cudnn", config_check.CONV_IMPLS),
  ("optim.name", "sgdd", optim.OPTIMIZERS),
  ("data.dataset", "office32", catalog.DATASETS),
  ("data.resize_method", "lanczos9", input_pipeline.RESIZE_METHODS),
  ("data.eval_mode", "12crop", input_pipeline.EVAL_MODES),
  ("data.train_sharding", "local", input_pipeline.TRAIN_SHARDINGS),
  ("data.eval_split", "validation", ("train", "test")),
  ("data.source", "mnist", ("digits", "digits_m")),
  ("data.target", "svhn", ("digits", "digits_m")),
  ("select_with", "snd2", validators.NAMES),
]
BOOLS = [
  "model.fused_pass",
  "optim.nesterov",
  "data.random_flip",
  "data.cache_resized",
  "loss.cdan_randomized",
]
# (field, bad value, what the message says is valid)
RANGES = [
  ("total_steps", 0, "an integer >= 1"),
  ("total_steps", -5, "an integer >= 1"),
  ("eval_every_steps", 0, "an integer >= 1"),
  ("checkpoint_every_steps", 0, "an integer >= 1"),
  ("log_every_steps", 0, "an integer >= 1"),
  ("keep_checkpoints", 0, "an integer >= 1"),
  ("batch_size", 0, "an integer >= 1"),
  ("data.eval_batch_size", 0, "an integer >= 1"),
  ("data.resize_size", 0, "an integer >= 1"),
  ("data.crop_size", 40, "an integer in [0, 32]"),
  ("seed", 2**32, "an integer in [0, 4294967295]"),
  ("seed", -1, "an integer in [0, 4294967295]"),
  ("optim.lr0", -0.1, "a number >= 0"),
  ("loss.threshold", 1.5, "a number in [0, 1]"),
  ("loss.threshold", -0.1, "a number in [0, 1]"),
  ("model.dropout_rate", 1.0, "a number in [0, 1)"),
  ("loss.ramp_max_steps", 0, "a number > 0"),
  ("loss.mcc_temperature", 0.0, "a number > 0"),
  ("loss.mada_weight", -0.3, "a number >= 0"),
  ("model.random_dim", 0, "an integer >= 1"),
  ("data.source_val_fraction", 1.0, "a number in [0, 1)"),
]


def _has(field: str) -> bool:
  node = _SMOKE
  for part in field.split("."):
    if part not in node:
      return False
    node = node[part]
  return True


def _main_cases(tmp: str) -> list:
  """(id, overrides, substrings of the error line) of every main case."""
  cases = []
  for field, value, choices in ENUMS:
    if _has(field):  # fields added in this release are checked once configs/default.py has them
      cases.append(
        (f"{field}={value}", [f"--config.{field}={value}"], [f"config.{field}={value!r}", *choices])
      )
  for field in BOOLS:
    if _has(field):
      cases.append(
        (
          f"{field}=maybe",
          [f"--config.{field}=maybe"],
          [f"--config.{field}=maybe is not a boolean; valid: true, false"],
        )
      )
  for field, value, valid in RANGES:
    cases.append(
      (
        f"{field}={value}",
        [f"--config.{field}={value}"],
        [f"invalid config.{field}={value!r}; valid: {valid}"],
      )
    )
  office = [
    "--config.data.dataset=office31",
    "--config.data.source=amazon",
    "--config.data.target=webcam",
  ]
  cases += [
    (
      "select_with_needs_a_source_split",
      ["--config.select_with=dev"],
      ["config.select_with='dev' needs a held-out source split", "data.source_val_fraction"],
    ),
    (
      "missing_weights",
      ["--config.model.backbone=resnet50", "--config.model.pretrained_path=/nope/r50.pth"],
      ["weights file '/nope/r50.pth' (config field model.pretrained_path) not found"],
    ),
    (
      "weights_need_resnet50",
      ["--config.model.pretrained_path=/nope/r50.pth"],
      ["invalid config.model.backbone='small_cnn'; valid: resnet50"],
    ),
    (
      "missing_manual_dir",
      office + [f"--config.data.manual_dir={tmp}/missing"],
      [f"the manual directory {tmp}/missing is missing or empty", "data.manual_dir"],
    ),
    (
      "missing_custom_tree",
      [
        "--config.data.dataset=custom",
        "--config.data.source=a",
        "--config.data.target=b",
        f"--config.data.manual_dir={tmp}/none",
      ],
      [f"custom dataset folder {tmp}/none is missing or empty", "data.manual_dir"],
    ),
  ]
  return cases


SWEEP_CASES = [  # (id, arguments, substrings of the error line)
  ("method", ["--methods=alda_dsnb"], ["'alda_dsnb'", "--methods", *methods.METHODS]),
  ("optim.name", ["--config.optim.name=sgdd"], ["config.optim.name='sgdd'", "sgd, adam"]),
  (
    "eval_mode",
    ["--config.data.eval_mode=12crop"],
    ["config.data.eval_mode='12crop'", "10crop, center"],
  ),
  ("threshold", ["--config.loss.threshold=2"], ["config.loss.threshold=2.0", "[0, 1]"]),
  ("task_domain", ["--tasks=digits->mnist"], ["config.data.target='mnist'", "digits_m"]),
  ("task_format", ["--tasks=digits"], ["invalid task 'digits'", "'source->target'"]),
  ("seed_type", ["--seeds=x"], ["invalid seeds ['x']", "integers"]),
  # the first run is valid (and would start first): nothing may run before every run is checked
  ("second_seed", ["--seeds=0,4294967296"], ["config.seed=4294967296", "[0, 4294967295]"]),
  ("second_task", ["--tasks=digits->digits_m,digits->mnist"], ["config.data.target='mnist'"]),
]

# (id, config.json field, value written there, substrings of the error line)
PREDICT_CASES = [
  ("method", "method", "alda_dsnb", ["config.method='alda_dsnb'", *methods.METHODS]),
  ("backbone", "model.backbone", "vgg", ["config.model.backbone='vgg'", *heads.BACKBONES]),
  ("dtype", "model.dtype", "bf16", ["config.model.dtype='bf16'", *heads.DTYPES]),
  ("eval_mode", "data.eval_mode", "12crop", ["config.data.eval_mode='12crop'", "10crop, center"]),
  (
    "resize_method",
    "data.resize_method",
    "lanczos9",
    ["config.data.resize_method='lanczos9'", *input_pipeline.RESIZE_METHODS],
  ),
  ("crop_size", "data.crop_size", 64, ["config.data.crop_size=64", "[0, 32]"]),
  (
    "matmul_precision",
    "model.matmul_precision",
    "fast",
    ["config.model.matmul_precision='fast'", *config_check.MATMUL_PRECISIONS],
  ),
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, digits_data_dir):
  """Runs the three drivers: main (which also makes the finished run), then sweep and predict."""
  tmp = str(tmp_path_factory.mktemp("config_check"))
  base = [f"--config.data.data_dir={digits_data_dir}"]
  finished = f"{tmp}/run"
  main_argv = ["main", f"--config={cli_driver.SMOKE}", *base]
  main_cases = _main_cases(tmp)
  spec = [  # the sequence: a typo in a new workdir, then the corrected command there
    {
      "id": "typo",
      "argv": main_argv + [f"--workdir={finished}", "--config.method=alda_dsnb"],
      "new": finished,
    },
    {"id": "corrected", "argv": main_argv + [f"--workdir={finished}"]},
  ]
  for cid, overrides, _ in main_cases:
    spec.append(
      {
        "id": f"{cid}/new",
        "argv": main_argv + [f"--workdir={tmp}/new/{cid}"] + overrides,
        "new": f"{tmp}/new/{cid}",
      }
    )
    spec.append(
      {
        "id": f"{cid}/existing",
        "argv": main_argv + [f"--workdir={finished}"] + overrides,
        "existing": finished,
      }
    )
  results = {"main": _drive("main", spec)}
  assert results["main"]["corrected"]["rc"] == 0, results["main"]["corrected"]["stderr"][-3000:]

  # An existing sweep root: the finished run where the sweep keeps it, and a summary.
  sweep_root = f"{tmp}/sweep"
  shutil.copytree(finished, f"{sweep_root}/alda_dsbn/digits-digits_m/seed0")
  sweep_argv = ["sweep", f"--config={cli_driver.SMOKE}", "--methods=alda_dsbn", "--seeds=0", *base]
  spec = []
  for cid, args, _ in SWEEP_CASES:
    new = f"{tmp}/newsweep/{cid}"
    spec.append({"id": f"{cid}/new", "argv": sweep_argv + [f"--workdir={new}"] + args, "new": new})
    spec.append(
      {
        "id": f"{cid}/existing",
        "argv": sweep_argv + [f"--workdir={sweep_root}"] + args,
        "existing": sweep_root,
      }
    )
  spec.append({"id": "finished", "argv": sweep_argv + [f"--workdir={sweep_root}"]})  # a good one
  results["sweep"] = _drive("sweep", spec)

  images = f"{tmp}/images"
  os.makedirs(images)
  shutil.copy(os.path.join(ROOT, "tests", "__init__.py"), images)  # not an image: never read
  spec = []
  for cid, field, value, _ in PREDICT_CASES:
    workdir = f"{tmp}/predict/{cid}"
    shutil.copytree(finished, workdir)
    path = os.path.join(workdir, "config.json")
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
    with open(path, "w", encoding="utf-8") as f:
      json.dump(cfg, f, indent=2)
    spec.append(
      {
        "id": cid,
        "argv": ["predict", f"--workdir={workdir}", f"--images={images}", f"--out={workdir}.csv"],
        "new": f"{workdir}.csv",
        "existing": workdir,
      }
    )
  spec.append(
    {
      "id": "batch_size",
      "argv": [
        "predict",
        f"--workdir={finished}",
        f"--images={images}",
        f"--out={tmp}/p.csv",
        "--batch_size=0",
      ],
      "new": f"{tmp}/p.csv",
      "existing": finished,
    }
  )
  results["predict"] = _drive("predict", spec)
  results["tmp"] = tmp
  return results


def _assert_refused(result: dict, expected) -> None:
  """Exit 2, one ``error:`` line holding every expected piece, no traceback, nothing written."""
  assert result["rc"] == 2, result["stderr"][-3000:]
  assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
  errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result["stderr"][-3000:]
  for piece in expected:
    assert piece in errors[0], (piece, errors[0])
  assert "another configuration" not in errors[0]
  if result["new_exists"] is not None:
    assert not result["new_exists"], "the new workdir was created"
  if result["existing_changed"] is not None:
    assert result["existing_changed"] == [], f"files changed: {result['existing_changed']}"


def test_a_typo_leaves_no_files_and_the_corrected_command_then_runs(matrix):
  _assert_refused(matrix["main"]["typo"], ["config.method='alda_dsnb'", *methods.METHODS])
  assert matrix["main"]["corrected"]["rc"] == 0


def _main_params():
  return [
    pytest.param(cid, variant, expected, id=f"{cid}-{variant}")
    for cid, _, expected in _main_cases("{tmp}")
    for variant in ("new", "existing")
  ]


@pytest.mark.parametrize("cid, variant, expected", _main_params())
def test_main_refuses_a_bad_config_before_touching_the_workdir(matrix, cid, variant, expected):
  _assert_refused(
    matrix["main"][f"{cid}/{variant}"],
    [e.format(tmp=matrix["tmp"]) if "{tmp}" in e else e for e in expected],
  )


@pytest.mark.parametrize(
  "cid, expected", [(c, e) for c, _, e in SWEEP_CASES], ids=[c for c, _, _ in SWEEP_CASES]
)
@pytest.mark.parametrize("variant", ["new", "existing"])
def test_sweep_checks_every_run_before_the_first_starts(matrix, cid, expected, variant):
  _assert_refused(matrix["sweep"][f"{cid}/{variant}"], expected)


def test_sweep_existing_root_is_a_valid_finished_sweep(matrix):
  """The existing root of the sweep cases is accepted as is by the same command without a fault."""
  assert matrix["sweep"]["finished"]["rc"] == 0, matrix["sweep"]["finished"]["stderr"][-3000:]


@pytest.mark.parametrize(
  "cid, expected",
  [(c, e) for c, _, _, e in PREDICT_CASES]
  + [("batch_size", ["invalid --batch_size=0; valid: an integer >= 1"])],
  ids=[c for c, _, _, _ in PREDICT_CASES] + ["batch_size"],
)
def test_predict_refuses_a_bad_run_config_before_writing(matrix, cid, expected):
  result = matrix["predict"][cid]
  _assert_refused(result, expected)
  if cid != "batch_size":
    assert f"/predict/{cid}/config.json" in result["stderr"]


# --------------------------------------------------------------------------------------------
# validate() itself, in process
# --------------------------------------------------------------------------------------------


def _config(name: str) -> ml_collections.ConfigDict:
  if name == "default":  # the package defaults every shipped config starts from
    return default_config()
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", ["default", "digits", "smoke", "office31", "officehome", "custom"])
def test_every_shipped_config_is_valid(name, tmp_path, monkeypatch):
  """On one device (this suite emulates 8; Office's batch of 36 is meant for one GPU)."""
  make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda: make_mesh(jax.devices()[:1]))
  config = _config(name)
  if config.data.dataset != "digits":  # the data a user would provide, and the weights
    tree = tmp_path / "data"
    for domain in (config.data.source or "a", config.data.target or "b"):
      (tree / domain / "c0").mkdir(parents=True)
    weights = tmp_path / "resnet50.pth"
    weights.write_bytes(b"")
    config.data.manual_dir, config.data.data_dir = str(tree), str(tmp_path / "tfds")
    config.data.source, config.data.target = config.data.source or "a", config.data.target or "b"
    if config.model.pretrained_path:
      config.model.pretrained_path = str(weights)
  config_check.validate(config)
  config_check.validate(config, for_predict=True)
  assert not (tmp_path / "tfds").exists()  # nothing prepared


def test_lr0_per_task_checks_its_rates_and_that_its_tasks_exist():
  config = _config("office31")
  config.data = _config("digits").data  # domains of a dataset that needs no files
  config.optim.lr0_per_task = {"digits->digits_m": -3e-4}
  with pytest.raises(UserError, match=r"config.optim.lr0_per_task=.*'source->target': lr0 >= 0"):
    config_check.validate(config)
  config.optim.lr0_per_task = {"digits->digts_m": 3e-4}  # a typo: the task would train at lr0
  with pytest.raises(UserError, match=r"lr0_per_task key 'digits->digts_m': unknown domain"):
    config_check.validate(config)
  config.optim.lr0_per_task = {"digits->digits_m": 3e-4, "d->dm": 1e-4}
  with pytest.raises(
    UserError, match=r"lr0_per_task: '(d|digits)->d.*' and '.*' are the same task"
  ):
    config_check.validate(config)
  config = _config("smoke")
  config.optim.lr0 = -1.0  # the per-task sentinel of earlier versions
  with pytest.raises(UserError, match=r"config.optim.lr0=-1.0; valid: a number >= 0 \(per-task"):
    config_check.validate(config)


def test_a_config_of_an_older_version_without_the_new_fields_is_accepted_for_predict():
  config = _config("smoke").to_dict()
  for field in ("matmul_precision", "fused_pass", "conv_impl"):
    config["model"].pop(field, None)
  del config["optim"]["name"], config["data"]["eval_split"]
  config_check.validate(ml_collections.ConfigDict(config), for_predict=True)


def test_new_model_fields_are_checked_when_present():
  config = _config("smoke")
  with config.unlocked():
    config.model.conv_impl = "cudnn"
  with pytest.raises(UserError, match=r"config.model.conv_impl='cudnn'.*auto, xla, matmul"):
    config_check.validate(config)


@pytest.mark.parametrize(
  "field, value, valid",
  [
    ("loss.cdan_randomized", "yes", "True, False"),
    ("model.random_dim", 0, "an integer >= 1"),
    ("loss.mcc_temperature", -2.5, "a number > 0"),
    ("loss.mada_weight", float("nan"), "a number >= 0"),
  ],
)
def test_the_comparison_methods_fields_are_checked(field, value, valid):
  """As a config.json holds them (any JSON type): one line naming the field; the two that shape
  the model (CDAN's D input and the randomized map's width) for predict too."""
  config = _config("smoke").to_dict()
  section, leaf = field.split(".")
  config[section][leaf] = value
  config = ml_collections.ConfigDict(config)
  modes = (False, True) if field.startswith(("model.", "loss.cdan")) else (False,)
  for for_predict in modes:
    with pytest.raises(UserError) as e:
      config_check.validate(config, for_predict=for_predict)
    assert str(e.value) == f"invalid config.{field}={value!r}; valid: {valid}"


def test_cdan_randomized_switches_cdan_to_the_randomized_map_of_model_random_dim():
  config = _config("smoke")
  config.method, config.loss.cdan_randomized, config.model.random_dim = "cdan_e", True, 48
  config_check.validate(config)
  method = methods.resolve(config)
  assert (method.name, method.randomized, method.spec.disc_input) == ("cdan_e", True, "random")
  assert method.spec.options == methods.METHODS["cdan_e"].options
  model = heads.create_model(config)
  assert (model.disc_input, model.random_dim) == ("random", 48)
  config.method = "mada"  # no multilinear map: the field changes nothing
  assert methods.resolve(config) == methods.resolve_name("mada")
