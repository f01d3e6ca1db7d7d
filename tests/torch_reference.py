"""A PyTorch re-implementation of the official ALDA (+ DSBN) training iteration: the parity oracle.

Written from the description of the official code in ``docs/reference.md`` §1-§5
and §8 (``loss.py::ALDA_loss``, ``network.py``, ``train.py::train``, ``lr_schedule.py``,
``model/dsbn.py``), in the reference's own style (confusion matrix + batched product, boolean-index
reductions, ``register_hook`` gradient reversal, ``requires_grad`` toggling) -- independently of the
JAX code under test. Only the CUDA calls are gone (CPU here).
"""

import functools

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck


# ---------------------------------------------------------------------------------- losses (§1)
def calc_coeff(iter_num, high=1.0, low=0.0, alpha=10.0, max_iter=10000.0) -> float:
  """``network.py::calc_coeff``, in float64 on the host as in the reference."""
  return float(
    2.0 * (high - low) / (1.0 + np.exp(-alpha * iter_num / max_iter)) - (high - low) + low
  )


def create_matrix(n: int) -> torch.Tensor:
  """1 on the diagonal, -1/(n-1) elsewhere (float32)."""
  a = np.full((n, n), -1.0 / (n - 1), dtype=np.float32)
  np.fill_diagonal(a, 1.0)
  return torch.from_numpy(a)


def alda_loss(ad_out_score, labels_source, softmax_out, threshold=0.9):
  """``loss.py::ALDA_loss`` -> (adv_loss, reg_loss, correct_loss); L_T is NaN if none confident."""
  ad_out = torch.sigmoid(ad_out_score)
  b, k = ad_out.size(0) // 2, ad_out.size(1)
  zeros = functools.partial(torch.zeros, dtype=ad_out.dtype)  # float32 in the parity tests
  labels_source_mask = zeros(b, k).scatter_(1, labels_source.unsqueeze(1), 1)
  _, argpred_s = torch.max(softmax_out[:b].detach(), dim=1)
  maxpred_t, argpred_t = torch.max(softmax_out[b:].detach(), dim=1)
  preds_source_mask = zeros(b, k).scatter_(1, argpred_s.unsqueeze(1), 1)
  preds_target_mask = zeros(b, k).scatter_(1, argpred_t.unsqueeze(1), 1)
  target_mask = maxpred_t > threshold
  preds_target_mask = torch.where(target_mask.unsqueeze(1), preds_target_mask, zeros(1))
  # eta[n, i, j]: (1 - I)/(K-1) + A * xi_n broadcast over the columns j.
  anti_eye = (1 - torch.eye(k, dtype=ad_out.dtype)).unsqueeze(0)
  a = create_matrix(k).to(ad_out.dtype)
  confusion = anti_eye / (k - 1) + a.unsqueeze(0) * ad_out.unsqueeze(1)
  preds_mask = torch.cat([preds_source_mask, preds_target_mask], dim=0)
  loss_pred = torch.bmm(confusion, preds_mask.unsqueeze(2)).squeeze(2)  # column y_hat of eta
  loss_target = torch.cat([labels_source_mask, (1 - preds_target_mask) / (k - 1)], dim=0)
  if not ((loss_pred >= 0).all() and (loss_pred <= 1).all()):
    raise AssertionError("corrected label outside [0, 1]")
  mask = torch.cat([torch.ones(b, dtype=torch.bool), target_mask], dim=0)
  adv_loss = nn.BCELoss(reduction="none")(loss_pred, loss_target)[mask]
  adv_loss = torch.sum(adv_loss) / mask.float().sum()
  reg_loss = nn.CrossEntropyLoss()(ad_out_score[:b], labels_source)
  correct_target = loss_pred[b:].detach()
  correct_loss = -(softmax_out[b:] * correct_target)
  correct_loss = torch.mean(correct_loss[target_mask])
  return adv_loss, reg_loss, correct_loss


def dann_loss(ad_out_prob):
  """``loss.py::DANN`` on D's sigmoid output: BCE against 1 (source rows) / 0 (target rows)."""
  b = ad_out_prob.size(0) // 2
  dc_target = torch.cat([torch.ones(b, 1), torch.zeros(b, 1)]).to(ad_out_prob.dtype)
  return nn.BCELoss()(ad_out_prob, dc_target)


# ----------------------------------------------------------------------------- networks (§2, §5)
class DSBN(nn.Module):
  """``model/dsbn.py``: one BatchNorm2d per domain; the branch is chosen per forward call."""

  def __init__(self, num_features, num_domains=2):
    super().__init__()
    self.bns = nn.ModuleList([nn.BatchNorm2d(num_features) for _ in range(num_domains)])
    self.domain = 0

  def forward(self, x):
    return self.bns[self.domain](x)


def set_domain(model: nn.Module, domain: int) -> None:
  """Routes every DSBN layer of ``model`` to branch ``domain`` (the official code passes labels)."""
  for m in model.modules():
    if isinstance(m, DSBN):
      m.domain = domain


def _norm_layer(num_domains):
  """Plain BN for shared-BN methods (as ALDA's torchvision ResNet), DSBN otherwise."""
  return nn.BatchNorm2d if num_domains == 1 else functools.partial(DSBN, num_domains=num_domains)


def resnet50_features(num_domains: int) -> nn.Module:
  """torchvision ResNet-50 (every BN replaced by DSBN when num_domains > 1), fc removed: 2048-d."""
  model = torchvision.models.resnet50(norm_layer=_norm_layer(num_domains))
  model.fc = nn.Identity()
  return model


class SmallResNet(nn.Module):
  """torchvision's ResNet layout (stem, Bottleneck stages, avg-pool) with a configurable width."""

  def __init__(self, stage_sizes, num_filters, num_domains):
    super().__init__()
    norm = _norm_layer(num_domains)
    self.conv1 = nn.Conv2d(3, num_filters, 7, 2, 3, bias=False)
    self.bn1 = norm(num_filters)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = num_filters
    for i, n in enumerate(stage_sizes):
      planes, blocks = num_filters * 2**i, []
      for j in range(n):
        stride = 2 if (i > 0 and j == 0) else 1
        down = None
        if stride != 1 or inplanes != planes * 4:
          down = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), norm(planes * 4)
          )
        blocks.append(Bottleneck(inplanes, planes, stride, down, norm_layer=norm))
        inplanes = planes * 4
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return torch.flatten(x.mean(dim=(2, 3)), 1)


def init_weights(m):
  """``network.py::init_weights`` for Linear layers: xavier_normal_ weight, zero bias."""
  if isinstance(m, nn.Linear):
    nn.init.xavier_normal_(m.weight)
    nn.init.zeros_(m.bias)


class ResNetFc(nn.Module):
  """``network.py::ResNetFc``: features -> bottleneck Linear (nothing else) -> classifier fc."""

  def __init__(self, backbone, feature_dim, bottleneck_dim, num_classes):
    super().__init__()
    self.backbone = backbone
    self.bottleneck = nn.Linear(feature_dim, bottleneck_dim)
    self.fc = nn.Linear(bottleneck_dim, num_classes)
    self.bottleneck.apply(init_weights)
    self.fc.apply(init_weights)

  def forward(self, x):
    x = self.bottleneck(self.backbone(x))
    return x, self.fc(x)


def grl_hook(coeff):
  return lambda grad: -coeff * grad.clone()


class AdversarialNetwork(nn.Module):
  """``Multi_AdversarialNetwork`` (raw K logits), or DANN's ``AdversarialNetwork`` (``sigmoid``)."""

  def __init__(
    self, in_feature, hidden_size, num_outputs, dropout=0.5, max_iter=10000.0, sigmoid=False
  ):
    super().__init__()
    self.ad_layer1 = nn.Linear(in_feature, hidden_size)
    self.ad_layer2 = nn.Linear(hidden_size, hidden_size)
    self.ad_layer3 = nn.Linear(hidden_size, num_outputs)
    self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
    self.apply(init_weights)
    self.iter_num, self.max_iter, self.sigmoid = 0, max_iter, sigmoid

  def forward(self, x):
    if self.training:
      self.iter_num += 1  # incremented *before* the coefficient: coeff(i + 1) at loop index i
    coeff = calc_coeff(self.iter_num, max_iter=self.max_iter)
    x = x * 1.0
    if self.training and x.requires_grad:
      x.register_hook(grl_hook(coeff))
    x = self.dropout1(torch.relu(self.ad_layer1(x)))
    x = self.dropout2(torch.relu(self.ad_layer2(x)))
    y = self.ad_layer3(x)
    return torch.sigmoid(y) if self.sigmoid else y


# --------------------------------------------------------------------------- optimisation (§2)
def make_sgd(groups, lr0, momentum=0.9, weight_decay=0.0005):
  """SGD over ``[(params, lr_mult), ...]``, decay_mult 2 on every group (``get_parameters``)."""
  param_groups = [{"params": list(p), "lr_mult": mult, "decay_mult": 2} for p, mult in groups]
  return torch.optim.SGD(
    param_groups, lr=lr0, momentum=momentum, weight_decay=weight_decay, nesterov=True
  )


def inv_lr_scheduler(optimizer, iter_num, gamma, power, lr, weight_decay):
  """``lr_schedule.py::inv_lr_scheduler``: lr·(1 + gamma·i)^-power times each group's mults."""
  lr = lr * (1 + gamma * iter_num) ** (-power)
  for group in optimizer.param_groups:
    group["lr"] = lr * group["lr_mult"]
    group["weight_decay"] = weight_decay * group["decay_mult"]
  return optimizer


class Trainer:
  """One ``train.py::train`` iteration per ``step`` call, for ALDA or DANN, DSBN or shared BN."""

  def __init__(
    self,
    base: ResNetFc,
    ad_net: AdversarialNetwork,
    *,
    method,
    lr0,
    threshold,
    trade_off,
    adv_weight,
    lr_gamma=0.001,
    lr_power=0.75,
    weight_decay=0.0005,
  ):
    self.base, self.ad_net, self.method = base, ad_net, method
    self.hp = dict(
      lr0=lr0,
      threshold=threshold,
      trade_off=trade_off,
      adv_weight=adv_weight,
      lr_gamma=lr_gamma,
      lr_power=lr_power,
      weight_decay=weight_decay,
    )
    head = list(base.bottleneck.parameters()) + list(base.fc.parameters())
    self.optimizer = make_sgd(
      [(base.backbone.parameters(), 1), (head, 10), (ad_net.parameters(), 10)],
      lr0,
      weight_decay=weight_decay,
    )

  def _forward(self, xs, xt):
    set_domain(self.base, 0)
    features_source, outputs_source = self.base(xs)
    set_domain(self.base, 1 if self.method.endswith("_dsbn") else 0)
    features_target, outputs_target = self.base(xt)
    features = torch.cat((features_source, features_target), dim=0)
    outputs = torch.cat((outputs_source, outputs_target), dim=0)
    return features, outputs_source, outputs

  def step(self, i, xs, ys, xt) -> dict:
    hp = self.hp
    self.base.train(True)
    self.ad_net.train(True)
    inv_lr_scheduler(
      self.optimizer, i, hp["lr_gamma"], hp["lr_power"], hp["lr0"], hp["weight_decay"]
    )
    self.optimizer.zero_grad()
    features, outputs_source, outputs = self._forward(xs, xt)
    softmax_out = nn.Softmax(dim=1)(outputs)
    out = {}
    if self.method.startswith("dann"):
      out["dann"] = dann_loss(self.ad_net(features))
      transfer_loss = hp["adv_weight"] * out["dann"]
    else:
      lam = out["lambda_t"] = calc_coeff(i, high=hp["trade_off"], max_iter=self.ad_net.max_iter)
      ad_out = self.ad_net(features)
      adv, reg, correct = alda_loss(ad_out, ys, softmax_out, threshold=hp["threshold"])
      transfer_loss = hp["adv_weight"] * adv + hp["adv_weight"] * lam * correct
      # reg_loss reaches the discriminator only: G/C params are frozen during its backward.
      for p in self.base.parameters():
        p.requires_grad = False
      reg.backward(retain_graph=True)
      for p in self.base.parameters():
        p.requires_grad = True
      out.update(adv=adv, reg=reg, correct=correct)
    out["ce"] = nn.CrossEntropyLoss()(outputs_source, ys)
    total = out["ce"] + transfer_loss
    total.backward()
    self.optimizer.step()
    out["loss"] = total
    return {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()}


# ------------------------------------------------------------------ torch <-> flax variable trees
def _flax_module_path(name: str):
  """``layer1.0.downsample.1`` -> ('layer1_0', 'downsample_bn'); heads/D keep their names."""
  parts = name.split(".")
  if parts[0] == "backbone":
    parts = parts[1:]
    if parts[0].startswith("layer"):
      rest = parts[2:]
      if rest[0] == "downsample":
        rest = [{"0": "downsample_conv", "1": "downsample_bn"}[rest[1]]]
      parts = [f"{parts[0]}_{parts[1]}", *rest]
    return ("backbone", *parts)
  if parts[0] == "fc":
    return ("classifier",)
  return tuple(parts)  # 'bottleneck'; D's 'ad_layerN' are prefixed with 'disc' by the caller


def _bn_entries(path, bns):
  stack = lambda f: np.stack([getattr(bn, f).detach().numpy() for bn in bns])  # noqa: E731
  return {
    ("params", *path, "scale"): stack("weight"),
    ("params", *path, "bias"): stack("bias"),
    ("batch_stats", *path, "mean"): stack("running_mean"),
    ("batch_stats", *path, "var"): stack("running_var"),
  }


def to_flax(base: ResNetFc, ad_net: nn.Module | None = None) -> dict:
  """Flat ``{(collection, *path): np.ndarray}`` of a torch model in the Flax layout."""
  named = [(n, m) for n, m in base.named_modules()]
  if ad_net is not None:
    named += [(f"disc.{n}", m) for n, m in ad_net.named_modules()]
  out = {}
  for name, m in named:
    path = ("disc", name.split(".", 1)[1]) if name.startswith("disc.") else None
    if isinstance(m, DSBN):
      out.update(_bn_entries(_flax_module_path(name), list(m.bns)))
    elif isinstance(m, nn.BatchNorm2d) and not name.split(".")[-2:-1] == ["bns"]:
      out.update(_bn_entries(_flax_module_path(name), [m]))
    elif isinstance(m, nn.Conv2d):
      w = m.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
      out[("params", *_flax_module_path(name), "kernel")] = w
    elif isinstance(m, nn.Linear):
      path = path or _flax_module_path(name)
      out[("params", *path, "kernel")] = m.weight.detach().numpy().T  # (out,in) -> (in,out)
      out[("params", *path, "bias")] = m.bias.detach().numpy()
  return {k: np.array(v, np.float32) for k, v in out.items()}


def perturb_bn(model: nn.Module, seed: int, bias_range=(-0.2, 0.2)) -> None:
  """Distinct random affine params and running stats in every BN (and every DSBN branch).

  A fresh BN is (1, 0, 0, 1) in every branch, which would let a swapped field or a wrong branch
  pass; residual-branch gammas stay small so activations stay O(1) through deep nets. A positive
  ``bias_range`` keeps most ReLUs active, which keeps deep-net gradients well conditioned.
  """
  g = torch.Generator().manual_seed(seed)
  lo, hi_b = bias_range
  with torch.no_grad():
    for name, m in model.named_modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        hi = 0.4 if ".bn3" in name else 1.2
        m.weight.copy_(torch.rand(c, generator=g) * (hi - 0.2) + 0.2)
        m.bias.copy_(torch.rand(c, generator=g) * (hi_b - lo) + lo)
        m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
