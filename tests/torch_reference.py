"""A PyTorch re-implementation of the official ALDA (+ DSBN) training iteration: the parity oracle
(and, with the comparison methods' oracles at the end, CDAN(+E)'s and MCC's iterations).

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
  """One training iteration per ``step`` call, DSBN (a ``_dsbn`` method name) or shared BN: ALDA's
  or DANN's (ALDA ``train.py::train``), CDAN's or CDAN+E's (thuml/CDAN ``pytorch/train_image.py``
  ``train``: the same loop, ``loss.CDAN`` as transfer loss) or MCC's (Versatile-Domain-Adaptation
  ``pytorch/train_image_office.py``: no discriminator, ``ad_net=None``)."""

  def __init__(
    self,
    base: ResNetFc,
    ad_net: AdversarialNetwork | None,
    *,
    method,
    lr0,
    threshold,
    trade_off,
    adv_weight,
    lr_gamma=0.001,
    lr_power=0.75,
    weight_decay=0.0005,
    mcc_temperature=2.5,
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
      mcc_temperature=mcc_temperature,
    )
    head = list(base.bottleneck.parameters()) + list(base.fc.parameters())
    groups = [(base.backbone.parameters(), 1), (head, 10)]
    groups += [] if ad_net is None else [(ad_net.parameters(), 10)]
    self.optimizer = make_sgd(groups, lr0, weight_decay=weight_decay)

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
    if self.ad_net is not None:
      self.ad_net.train(True)
    inv_lr_scheduler(
      self.optimizer, i, hp["lr_gamma"], hp["lr_power"], hp["lr0"], hp["weight_decay"]
    )
    self.optimizer.zero_grad()
    features, outputs_source, outputs = self._forward(xs, xt)
    softmax_out = nn.Softmax(dim=1)(outputs)
    out = {}
    name = self.method.removesuffix("_dsbn")
    if name == "dann":
      out["dann"] = dann_loss(self.ad_net(features))
      transfer_loss = hp["adv_weight"] * out["dann"]
    elif name in ("cdan", "cdan_e"):  # train_image.py: loss.CDAN(..., network.calc_coeff(i), ...)
      entropy_ = coeff = None
      if name == "cdan_e":
        entropy_ = entropy(softmax_out)
        coeff = out["entropy_coeff"] = calc_coeff(i, max_iter=self.ad_net.max_iter)
      out["cdan"] = cdan_loss([features, softmax_out], self.ad_net, entropy_, coeff)
      transfer_loss = hp["adv_weight"] * out["cdan"]
    elif name == "mcc":  # train_image_office.py: the MCC term on the target logits
      outputs_target = outputs[xs.size(0) :]
      out["mcc"] = mcc_loss(outputs_target, hp["mcc_temperature"], outputs.size(1))
      transfer_loss = hp["adv_weight"] * out["mcc"]
    elif name == "alda":
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
    else:
      raise ValueError(f"no reference iteration for {self.method!r}")
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


# ------------------------------------------------------------ comparison methods (§12-§16)
# Oracles for dsbn_jax/methods/{cdan,jan,mada,mcc,bnm}.py, written from the upstream formulas in the
# upstream code's own structure (CPU, no ``.cuda()``).
def entropy(input_):
  """CDAN ``loss.py::Entropy``: -Σ p log(p + 1e-5) per row (used by CDAN+E and MCC)."""
  return torch.sum(-input_ * torch.log(input_ + 1e-5), dim=1)


class RandomLayer(nn.Module):
  """CDAN ``network.py::RandomLayer``; its ``torch.randn`` matrices ([in_dim_i, output_dim]) are
  passed in here, so that both sides of a parity test use the same ones."""

  def __init__(self, random_matrix, output_dim=1024):
    super().__init__()
    self.random_matrix, self.output_dim = list(random_matrix), output_dim

  def forward(self, input_list):
    outs = [torch.mm(x, m) for x, m in zip(input_list, self.random_matrix)]
    result = outs[0] / float(self.output_dim) ** (1.0 / len(outs))
    for single in outs[1:]:
      result = torch.mul(result, single)
    return result


def cdan_loss(input_list, ad_net, entropy=None, coeff=None, random_layer=None):
  """CDAN ``loss.py::CDAN``: the map of [features, detached softmax] through ``ad_net`` (sigmoid
  output, GRL inside), BCE against 1 (source half) / 0 (target half); with ``entropy``, CDAN+E's
  per-domain weights through a reversal hook of ``coeff``, every normaliser a detached float."""
  softmax_output = input_list[1].detach()
  feature = input_list[0]
  if random_layer is None:
    op_out = torch.bmm(softmax_output.unsqueeze(2), feature.unsqueeze(1))
    ad_out = ad_net(op_out.view(-1, softmax_output.size(1) * feature.size(1)))
  else:
    random_out = random_layer.forward([feature, softmax_output])
    ad_out = ad_net(random_out.view(-1, random_out.size(1)))
  b = softmax_output.size(0) // 2
  dc_target = torch.cat([torch.ones(b, 1), torch.zeros(b, 1)])
  if entropy is None:
    return nn.BCELoss()(ad_out, dc_target)
  entropy.register_hook(grl_hook(coeff))
  entropy = 1.0 + torch.exp(-entropy)
  source_mask = torch.ones_like(entropy)
  source_mask[b:] = 0
  target_mask = 1 - source_mask
  source_weight, target_weight = entropy * source_mask, entropy * target_mask
  weight = (
    source_weight / torch.sum(source_weight).detach().item()
    + target_weight / torch.sum(target_weight).detach().item()
  )
  bce = nn.BCELoss(reduction="none")(ad_out, dc_target)
  return torch.sum(weight.view(-1, 1) * bce) / torch.sum(weight).detach().item()


def mada_loss(feature, softmax_out, ad_nets, coeff):
  """thuml/MADA ``train_val.prototxt`` after the classifier: outer product (no gradient to the
  softmax), one GRL, a slice into K inputs, D_k each, ``SigmoidCrossEntropyLoss`` (mean over the
  batch) against source 0 / target 1, the K losses summed (their loss_weight is left out)."""
  all_product = softmax_out.detach().unsqueeze(2) * feature.unsqueeze(1)  # [N, K, F]
  all_product = all_product * 1.0
  all_product.register_hook(grl_hook(coeff))
  b = feature.size(0) // 2
  dc_labels = torch.cat([torch.zeros(b, 1), torch.ones(b, 1)])
  return sum(
    nn.BCEWithLogitsLoss()(ad_net(all_product[:, k, :]), dc_labels)
    for k, ad_net in enumerate(ad_nets)
  )


def mcc_loss(outputs_target, temperature, class_num):
  """Versatile-Domain-Adaptation ``train_image_office.py``: the MCC term on the target logits."""
  train_bs = outputs_target.size(0)
  target_softmax_out_temp = nn.Softmax(dim=1)(outputs_target / temperature)
  target_entropy_weight = entropy(target_softmax_out_temp).detach()
  target_entropy_weight = 1 + torch.exp(-target_entropy_weight)
  target_entropy_weight = train_bs * target_entropy_weight / torch.sum(target_entropy_weight)
  cov_matrix_t = (
    target_softmax_out_temp.mul(target_entropy_weight.view(-1, 1))
    .transpose(1, 0)
    .mm(target_softmax_out_temp)
  )
  cov_matrix_t = cov_matrix_t / torch.sum(cov_matrix_t, dim=1)
  return (torch.sum(cov_matrix_t) - torch.trace(cov_matrix_t)) / class_num


def bnm_loss(softmax_tgt):
  """cuishuhao/BNM ``DA/BNM/train_image.py`` (method BNM): -mean of the singular values.

  ``torch.svd(A)`` (some=True) is ``torch.linalg.svd(A, full_matrices=False)``; the latter is called
  here because the former warns that it is deprecated.
  """
  _, s_tgt, _ = torch.linalg.svd(softmax_tgt, full_matrices=False)
  return -torch.mean(s_tgt)


class GaussianKernel(nn.Module):
  """TLlib ``modules/kernels.py::GaussianKernel``: σ² = alpha · mean ‖x_i - x_j‖² (detached), or a
  fixed σ."""

  def __init__(self, sigma=None, track_running_stats=True, alpha=1.0):
    super().__init__()
    self.sigma_square = torch.tensor(sigma * sigma) if sigma is not None else None
    self.track_running_stats, self.alpha = track_running_stats, alpha

  def forward(self, X):
    l2_distance_square = ((X.unsqueeze(0) - X.unsqueeze(1)) ** 2).sum(2)
    if self.track_running_stats:
      self.sigma_square = self.alpha * torch.mean(l2_distance_square.detach())
    return torch.exp(-l2_distance_square / (2 * self.sigma_square))


def _update_index_matrix(batch_size):
  """TLlib ``alignment/dan.py::_update_index_matrix`` with ``linear=False``."""
  index_matrix = torch.zeros(2 * batch_size, 2 * batch_size)
  for i in range(batch_size):
    for j in range(batch_size):
      if i != j:
        index_matrix[i][j] = 1.0 / float(batch_size * (batch_size - 1))
        index_matrix[i + batch_size][j + batch_size] = 1.0 / float(batch_size * (batch_size - 1))
  for i in range(batch_size):
    for j in range(batch_size):
      index_matrix[i][j + batch_size] = -1.0 / float(batch_size * batch_size)
      index_matrix[i + batch_size][j] = -1.0 / float(batch_size * batch_size)
  return index_matrix


def jmmd_loss(z_s, z_t):
  """TLlib ``JointMultipleKernelMaximumMeanDiscrepancy(linear=False)`` with the kernels of its JAN
  script: ``z_s = (f_s, softmax_s)``, ``z_t = (f_t, softmax_t)``."""
  kernels = (
    [GaussianKernel(alpha=2**k) for k in range(-3, 2)],
    (GaussianKernel(sigma=0.92, track_running_stats=False),),
  )
  batch_size = int(z_s[0].size(0))
  index_matrix = _update_index_matrix(batch_size)
  kernel_matrix = torch.ones_like(index_matrix)
  for layer_z_s, layer_z_t, layer_kernels in zip(z_s, z_t, kernels):
    layer_features = torch.cat([layer_z_s, layer_z_t], dim=0)
    kernel_matrix *= sum([kernel(layer_features) for kernel in layer_kernels])
  return (kernel_matrix * index_matrix).sum() + 2.0 / float(batch_size - 1)
