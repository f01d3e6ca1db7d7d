"""The method registry (dsbn_jax/methods/): names, ``model.bn`` and the ``_dsbn`` aliases, one
module per method behind the train step, and the discriminator kinds the new methods read."""

import functools
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsbn_jax import checkpointing, config_check, config_defaults, losses, methods, train_step
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads
from tests import suite_env
from tests.train_step_test import NUM_CLASSES, SIZE, SMALL, make_batch, make_config, small_state


def test_the_registry_and_the_config_check_import_without_jax():
  """config_check reads the registry before JAX (or TensorFlow) loads."""
  code = (
    "import sys, dsbn_jax.methods, dsbn_jax.config_check\n"
    "heavy = [m for m in ('jax', 'flax', 'tensorflow', 'torch') if m in sys.modules]\n"
    "assert not heavy, heavy"
  )
  subprocess.run(
    [sys.executable, "-c", code], cwd=suite_env.ROOT, env=suite_env.subprocess_env(1), check=True
  )


def _config(method, bn=None, **fields):
  cfg = config_defaults.get_config("digits")
  cfg.method = method
  if bn is not None:
    cfg.model.bn = bn
  cfg.update(fields)
  return cfg


@pytest.mark.parametrize(
  "method, bn, name, resolved_bn, display",
  [
    ("alda", "auto", "alda", "shared", "alda"),
    ("alda", "shared", "alda", "shared", "alda"),
    ("alda", "dsbn", "alda", "dsbn", "alda_dsbn"),
    ("alda_dsbn", "auto", "alda", "dsbn", "alda_dsbn"),  # the paper's method, as always named
    ("alda_dsbn", "dsbn", "alda", "dsbn", "alda_dsbn"),
    ("dann_dsbn", "auto", "dann", "dsbn", "dann_dsbn"),
    ("dann", "dsbn", "dann", "dsbn", "dann_dsbn"),
    ("source_only", "auto", "source_only", "shared", "source_only"),
    ("alda_dsbn", None, "alda", "dsbn", "alda_dsbn"),  # config.json of a run before model.bn
  ],
)
def test_a_name_and_model_bn_resolve_to_one_method_and_bn(method, bn, name, resolved_bn, display):
  cfg = _config(method, bn)
  if bn is None:  # written before the field existed: no model.bn at all
    saved = cfg.to_dict()
    del saved["model"]["bn"]
    cfg = ml_collections.ConfigDict(saved)
  got = methods.resolve(cfg)
  assert (got.name, got.bn, got.display_name) == (name, resolved_bn, display)
  assert methods.resolve_name(display) == got  # the display name is a config.method of the pair
  assert (got.num_domains, got.target_branch) == ((2, 1) if resolved_bn == "dsbn" else (1, 0))
  model = heads.create_model(cfg)
  assert model == heads.create_model(_config(display))  # the same model, however it is spelt
  assert model.backbone.num_domains == got.num_domains


@pytest.mark.parametrize(
  "method, bn, pieces",
  [
    (
      "alda_dsbn",
      "shared",
      ["config.model.bn='shared'", "config.method='alda_dsbn'", "config.method='alda'", "'auto'"],
    ),
    ("dann_dsbn", "shared", ["config.model.bn='shared'", "config.method='dann'"]),
    ("alda", "both", ["config.model.bn='both'", "auto, shared, dsbn"]),
    ("alda_dsbn_dsbn", "auto", ["config.method='alda_dsbn_dsbn'", "dann_dsbn, alda_dsbn"]),
    # source_only has no DSBN form: its target branch would be evaluated untrained.
    ("source_only_dsbn", "auto", ["source_only with DSBN", "model.bn='shared' for source_only"]),
    ("source_only", "dsbn", ["config.method='source_only', config.model.bn='dsbn'", "untrained"]),
  ],
)
def test_bad_names_and_contradicting_bn_are_one_line_errors(method, bn, pieces):
  """From the registry, the config check (main, sweep and predict run it before writing
  anything) and the model alike."""
  cfg = _config(method, bn)
  for check in (
    methods.resolve,
    functools.partial(config_check.validate, for_predict=True),
    heads.create_model,
  ):
    with pytest.raises(UserError) as e:
      check(cfg)
    assert "\n" not in str(e.value) and all(p in str(e.value) for p in pieces), str(e.value)


# --------------------------------------------------------- every method with each BN, stepped
METRICS = {  # what each method logs (train/...), besides loss, ce, lr and source_acc
  "source_only": set(),
  "dann": {"dann", "grl_coeff", "confident_frac", "target_acc"},
  "alda": {"adv", "reg", "correct", "grl_coeff", "lambda_t", "confident_frac", "target_acc"},
  # Stepped in tests/method_devices_test.py (with these same checks, one BN choice each).
  "cdan": {"cdan", "grl_coeff", "confident_frac", "target_acc"},
  "cdan_e": {"cdan", "grl_coeff", "entropy_coeff", "confident_frac", "target_acc"},
  "jan": {"jmmd", "target_acc"},
  "mada": {"mada", "grl_coeff", "confident_frac", "target_acc"},
  "mcc": {"mcc", "target_acc"},
  "bnm": {"bnm", "target_acc"},
}


def _moved(before, after) -> list[bool]:
  """Per BN branch: whether any running statistic of the backbone moved."""
  pairs = list(zip(jax.tree.leaves(before), jax.tree.leaves(after)))
  return [any(float(np.abs(a[d] - b[d]).max()) > 1e-7 for b, a in pairs) for d in range(2)]


# The other methods are stepped, with these checks, in tests/method_devices_test.py.
@pytest.mark.parametrize(  # source_only has no DSBN form (refused: see above)
  "method, bn", [("source_only", "shared")] + [(m, b) for m in ("dann", "alda") for b in methods.BN]
)
def test_every_method_builds_and_steps_with_each_bn(method, bn):
  """Two steps of ``method`` with ``model.bn=bn`` on the small CNN: finite metrics, the method's
  own, and the BN branches it should move: the source branch always, the target branch (branch 1)
  with DSBN."""
  cfg = make_config(method, **SMALL)
  cfg.model.bn, cfg.model.dropout_rate, cfg.loss.threshold = bn, 0.5, 0.3
  resolved = methods.resolve(cfg)
  state = small_state(cfg, spread=True)
  stats = state.batch_stats["backbone"]
  assert {s.shape[0] for s in jax.tree.leaves(stats)} == {resolved.num_domains}
  step = jax.jit(functools.partial(train_step.train_step, cfg=cfg))
  rng = np.random.default_rng(0)
  new = state
  for _ in range(2):
    new, metrics = step(new, make_batch(rng, 4, SIZE), jax.random.key(0))
  assert set(metrics) == {
    f"train/{k}" for k in {"loss", "ce", "lr", "source_acc"} | METRICS[method]
  }
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert ("disc" in new.params) == (method != "source_only")
  if bn == "dsbn":
    assert _moved(stats, new.batch_stats["backbone"]) == [True, True]
  else:
    pairs = zip(jax.tree.leaves(stats), jax.tree.leaves(new.batch_stats["backbone"]))
    assert any(float(np.abs(a - b).max()) > 1e-7 for b, a in pairs)


# ------------------------------------------- the discriminator kinds of the new methods, stepped
def _cdan_like_terms(out, discriminate, coeffs, cfg):
  """A randomized-map D loss (CDAN's form, written here: the real one is methods/cdan.py)."""
  del cfg
  r_f, r_g = out.random_matrices
  probs = jax.lax.stop_gradient(jax.nn.softmax(out.logits_N, axis=-1))
  h = (out.feat_N @ r_f) / jnp.sqrt(jnp.float32(r_f.shape[1])) * (probs @ r_g)
  d_logits = discriminate(losses.gradient_reversal(h, coeffs["grl_coeff"]))
  return {"domain": losses.dann_loss(d_logits, out.mask_N)}


def _mada_like_terms(out, discriminate, coeffs, cfg):
  """K class-wise D_k on p_k·f (MADA's form, written here: the real one is methods/mada.py)."""
  del cfg
  probs = jax.lax.stop_gradient(jax.nn.softmax(out.logits_N, axis=-1))
  h = probs[:, :, None] * out.feat_N[:, None, :]
  d_logits = discriminate(losses.gradient_reversal(h, coeffs["grl_coeff"]))  # [N, K]
  return {"domain": sum(losses.dann_loss(d_logits[:, k : k + 1]) for k in range(NUM_CLASSES))}


@pytest.mark.parametrize(
  "spec, terms",
  [
    (methods.MethodSpec("test", discriminator="dann", disc_input="random"), _cdan_like_terms),
    (methods.MethodSpec("test", discriminator="mada", disc_input="classwise"), _mada_like_terms),
  ],
  ids=["random_map", "classwise"],
)
def test_a_method_on_the_new_discriminators_trains_and_checkpoints(
  spec, terms, monkeypatch, tmp_path
):
  """A method registered with CDAN's randomized map or MADA's K class-wise discriminators (a test
  module): the step gives it the model's fixed random matrices, D moves (every D_k), the matrices
  never do (optimizer group 'frozen'), and a checkpoint saves and restores them."""
  module = types.SimpleNamespace(
    loss_terms=terms,
    objective=lambda t, coeffs, cfg: (t["ce"] + t["domain"], 0.0),
    metrics=lambda out, coeffs, cfg: {"grl_coeff": coeffs["grl_coeff"]},
  )
  monkeypatch.setitem(methods.METHODS, "test", spec)
  monkeypatch.setattr(methods, "NAMES", (*methods.NAMES, "test"))
  monkeypatch.setattr(methods, "method_module", lambda method: module)
  cfg = make_config("test", **SMALL)
  cfg.model.dropout_rate = 0.5
  model = heads.create_model(cfg)
  state = train_step.create_train_state(jax.random.key(0), cfg, model, (SIZE, SIZE, 3))
  step = jax.jit(functools.partial(train_step.train_step, cfg=cfg))
  rng = np.random.default_rng(0)
  new = state
  for _ in range(2):
    new, metrics = step(new, make_batch(rng, 4, SIZE), jax.random.key(0))
  assert all(np.isfinite(float(v)) for v in metrics.values()) and float(metrics["train/domain"]) > 0

  def layer1(s):  # D's first kernel; [K, F, hidden] for the K stacked D_k
    disc = s.params["disc"]
    return np.asarray(
      (disc["d_k"] if spec.discriminator == "mada" else disc)["ad_layer1"]["kernel"]
    )

  change = np.abs(layer1(new) - layer1(state))
  per_d = change.reshape(NUM_CLASSES if spec.discriminator == "mada" else 1, -1)
  assert (per_d.max(axis=1) > 1e-6).all()  # every D_k moved
  if spec.disc_input == "random":
    assert set(new.params["random_map"]) == {"r_f", "r_g"}
    jax.tree.map(
      np.testing.assert_array_equal, new.params["random_map"], state.params["random_map"]
    )
    assert "frozen" in new.opt_state.inner_states
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(2, new, {})
  ckpt.close()
  restored = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  _, back, _ = restored.restore_latest(new, print)
  restored.close()
  jax.tree.map(
    np.testing.assert_array_equal, (back.params, back.opt_state), (new.params, new.opt_state)
  )
