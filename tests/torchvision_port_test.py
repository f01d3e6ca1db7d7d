"""The torchvision weight port: parity with real torchvision, both .pth formats, torch-free, strict."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
import torch
import torchvision
from flax import traverse_util

from dsbn_jax.errors import UserError
from dsbn_jax.models import resnet
from dsbn_jax.models.torchvision_port import load_pretrained_backbone, load_resnet50
from tests import torch_utils


@pytest.fixture(scope="module")
def torch_model():
  return torch_utils.perturbed_resnet50(seed=0)


@pytest.fixture(scope="module")
def pth_files(torch_model, tmp_path_factory):
  d = tmp_path_factory.mktemp("weights")
  zip_path, legacy_path = d / "resnet50_zip.pth", d / "resnet50_legacy.pth"
  torch.save(torch_model.state_dict(), zip_path)
  torch.save(torch_model.state_dict(), legacy_path, _use_new_zipfile_serialization=False)
  return {"zip": zip_path, "legacy": legacy_path}


@pytest.fixture(scope="module")
def variables(pth_files):
  return load_resnet50(pth_files["zip"], num_domains=2)


def _torch_features(model, x_NHWC):
  model.fc = torch.nn.Identity()
  with torch.no_grad():
    return model(torch_utils.nhwc_to_nchw(x_NHWC)).numpy()


@pytest.mark.parametrize("size", [224, 193])
def test_eval_features_match_torchvision_for_every_branch(torch_model, variables, size):
  x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  ref = _torch_features(torch_model.eval(), x)
  model = resnet.ResNet50(num_domains=2)
  for d in (0, 1):
    feats = jax.jit(lambda v, x, d=d: model.apply(v, x, domain=d, train=False))(variables, x)
    assert feats.shape == (2, 2048)
    err = float(np.abs(np.asarray(feats) - ref).max())
    assert err <= 1e-4, (
      f"domain {d}, {size}px: max|delta| = {err} (feature scale {np.abs(ref).max()})"
    )


@pytest.mark.parametrize("num_domains,domain", [(2, 0), (2, 1), (1, 0)])
def test_train_mode_output_and_running_statistics_match_torch(num_domains, domain):
  """Train mode through one BN branch of the DSBN ResNet-50 (the other branch untouched), and
  through the plain-BN ResNet-50 (``num_domains=1``: the source-only, DANN and ALDA baselines)."""
  torch_model = torch_utils.perturbed_resnet50(seed=3)
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  from dsbn_jax.models.torchvision_port import convert_state_dict

  variables = convert_state_dict(sd, num_domains=num_domains)
  x = np.random.default_rng(1).normal(size=(4, 96, 96, 3)).astype(np.float32)

  model = resnet.ResNet50(num_domains=num_domains)
  feats, updates = jax.jit(
    lambda v, x: model.apply(v, x, domain=domain, train=True, mutable=["batch_stats"])
  )(variables, x)
  ref = _torch_features(torch_model.train(), x)
  np.testing.assert_allclose(np.asarray(feats), ref, atol=1e-4, rtol=0)

  new = traverse_util.flatten_dict(updates["batch_stats"])
  old = traverse_util.flatten_dict(variables["batch_stats"])
  bns = torch_utils.bn_modules(torch_model)
  assert len(bns) == 53 and len(new) == 2 * 53
  for path, bn in bns.items():
    for ours, theirs in (("mean", bn.running_mean), ("var", bn.running_var)):
      got = np.asarray(new[(*path, ours)])
      assert got.shape[0] == num_domains
      np.testing.assert_allclose(
        got[domain], theirs.numpy(), atol=1e-5, rtol=0, err_msg=f"{path} {ours}"
      )
      for other in set(range(num_domains)) - {domain}:  # the other branch is untouched
        np.testing.assert_array_equal(got[other], np.asarray(old[(*path, ours)])[other])


_TORCH_FREE_LOAD = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any 'import torch' now raises ImportError
    import numpy as np
    from flax import traverse_util
    from dsbn_jax.models.torchvision_port import load_pretrained_backbone, load_resnet50
    v = load_resnet50(sys.argv[1], num_domains=2)
    assert sys.modules["torch"] is None
    flat = traverse_util.flatten_dict(v, sep="/")
    np.savez(sys.argv[2], **{k: np.asarray(a) for k, a in flat.items()})
""")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_loader_needs_no_torch_on_both_formats(pth_files, variables, fmt, tmp_path):
  out = tmp_path / "v.npz"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  subprocess.run(
    [sys.executable, "-c", _TORCH_FREE_LOAD, str(pth_files[fmt]), str(out)],
    check=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(__file__)),
  )
  loaded = np.load(out)
  flat = traverse_util.flatten_dict(variables, sep="/")
  assert set(loaded.files) == set(flat)
  for k, v in flat.items():
    np.testing.assert_array_equal(loaded[k], np.asarray(v), err_msg=k)


def test_branches_are_copies_and_kernels_are_transposed(torch_model, variables):
  sd = torch_model.state_dict()
  np.testing.assert_array_equal(
    variables["params"]["conv1"]["kernel"], sd["conv1.weight"].numpy().transpose(2, 3, 1, 0)
  )
  for d in (0, 1):
    np.testing.assert_array_equal(
      variables["batch_stats"]["layer2_0"]["downsample_bn"]["var"][d],
      sd["layer2.0.downsample.1.running_var"].numpy(),
    )
    np.testing.assert_array_equal(
      variables["params"]["layer4_2"]["bn3"]["scale"][d], sd["layer4.2.bn3.weight"].numpy()
    )


def _save(sd, path):
  torch.save(sd, path)
  return path


def test_strict_errors_name_the_key(torch_model, tmp_path):
  sd = torch_model.state_dict()
  missing = {k: v for k, v in sd.items() if k != "layer3.1.bn2.running_var"}
  with pytest.raises(UserError, match=r"missing key for batch_stats/layer3_1/bn2/var"):
    load_resnet50(_save(missing, tmp_path / "m.pth"))
  extra = {**sd, "layer1.0.se.weight": torch.zeros(3)}
  with pytest.raises(UserError, match=r"unexpected key 'layer1.0.se.weight'"):
    load_resnet50(_save(extra, tmp_path / "u.pth"))
  bad = {**sd, "layer2.0.conv2.weight": torch.zeros(128, 128, 1, 1)}
  with pytest.raises(UserError, match=r"key 'layer2.0.conv2.weight' has shape \(128, 128, 1, 1\)"):
    load_resnet50(_save(bad, tmp_path / "s.pth"))


def test_other_architecture_and_missing_file_are_one_line_errors(tmp_path):
  path = _save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
  with pytest.raises(UserError, match="not a torchvision ResNet-50 state_dict") as e:
    load_resnet50(path)
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match=r"resnet50-19c8e357.pth.*--config.model.weights") as e:
    load_resnet50(tmp_path / "nope.pth", config_field="model.weights")
  assert "\n" not in str(e.value)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint at all")
  with pytest.raises(UserError, match="garbage.pth"):
    load_resnet50(garbage)


def _config(method="alda_dsbn", **model):
  model = {"backbone": "resnet50", "pretrained_path": "", **model}
  return ml_collections.ConfigDict({"method": method, "model": model})


def test_pretrained_backbone_loading_rules(tmp_path, pth_files):
  assert load_pretrained_backbone(_config()) is None  # '' = random init
  with pytest.raises(UserError, match="resnet50"):
    load_pretrained_backbone(_config(backbone="small_cnn", pretrained_path="x.pth"))
  with pytest.raises(UserError, match="model.pretrained_path"):
    load_pretrained_backbone(_config(pretrained_path=str(tmp_path / "missing.pth")))
  for method, branches in (("alda", 1), ("alda_dsbn", 2)):  # one BN copy per branch of the method
    loaded = load_pretrained_backbone(_config(method, pretrained_path=str(pth_files["zip"])))
    assert loaded["batch_stats"]["bn1"]["mean"].shape == (branches, 64), method
