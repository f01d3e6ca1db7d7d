"""Shared defaults: ALDA + DSBN on ResNet-50 with the official ALDA Office hyper-parameters.

Experiment configs import this and override a few fields. The values follow the official ALDA code
(``train.py`` ``__main__``, ``train.sh``; docs/reference.md §1-§5) unless a comment says
otherwise. The data side (domains, paths, image size, crops) is configured in ``configs/data.py``.
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import configs.*
from configs import data as data_lib  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
  """Every field, with its meaning and unit."""
  config = ml_collections.ConfigDict()
  # Training method: 'source_only' (CE on source, shared BN), 'dann' (DANN domain loss, 1-logit D,
  # GRL, shared BN), 'alda' (ALDA, shared BN), 'alda_dsbn' (ALDA with domain-specific BN: the
  # paper's method), 'dann_dsbn' (DANN with domain-specific BN).
  config.method = "alda_dsbn"
  config.seed = 0  # PRNG seed for init and dropout (int)
  # Images per domain per step, global over all devices: 36 source + 36 target (reference). With a
  # multi-device mesh it must divide by the device count (the reference used 32 per GPU there).
  config.batch_size = 36

  config.model = m = ml_collections.ConfigDict()
  m.backbone = "resnet50"  # 'resnet50' | 'resnet' (generic bottleneck ResNet below) | 'small_cnn'
  m.stage_sizes = (3, 4, 6, 3)  # 'resnet' only: bottleneck blocks per stage
  m.num_filters = 64  # 'resnet' only: stem/first-stage width (channels); x2 per stage, x4 output
  m.feature_dim = 500  # 'small_cnn' only: width of its last fc layer (features)
  m.num_classes = 65  # K: output classes (65 Office-Home, 31 Office-31)
  m.bottleneck_dim = 512  # bottleneck Linear width (features); 0 = no bottleneck layer
  m.disc_hidden_dim = 1024  # discriminator hidden width (units), both hidden layers
  m.dropout_rate = 0.5  # discriminator dropout probability; 0 disables dropout
  m.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (params and BN stats stay float32)
  # float32 matmul/conv precision: 'default' (the hardware's fast passes where it has them: TF32 on
  # NVIDIA Ampere and later, bf16 passes on TPU; exact float32 on CPU) | 'high' | 'highest' (strict
  # float32 everywhere: parity work). Only float32 compute is affected (model.dtype='float32').
  m.matmul_precision = "default"
  # True: one backbone pass over the source and target batches together (each domain still
  # normalised with its own batch statistics and branch: the same maths as the reference's two
  # calls, tested to 1e-5). Off by default: on CPU it measured 0.83-0.98x the speed of two calls
  # (BENCHMARKS.md); on GPUs it halves the kernel launches of a step (not measured yet).
  m.fused_pass = False
  # How the ResNet convolutions are computed (same params, same values; models/conv.py): 'auto'
  # (1x1 convs as channel matmuls when JAX's default backend is CPU, where that is ~2x faster than
  # XLA's conv; the plain conv on GPU/TPU) | 'xla' (always lax.conv_general_dilated) | 'matmul'
  # (1x1 convs as matmuls on every backend).
  m.conv_impl = "auto"
  # torchvision ImageNet V1 ResNet-50 weights (resnet50-19c8e357.pth); '' = random init.
  m.pretrained_path = ""

  config.optim = o = ml_collections.ConfigDict()
  o.name = "sgd"  # 'sgd' (reference Office: SGD + Nesterov) | 'adam' (torch Adam update rule)
  o.lr0 = 0.001  # base learning rate (backbone); 0.0003 for Office-31 A->D and D->W
  o.momentum = 0.9  # SGD momentum
  o.nesterov = True  # Nesterov momentum (torch.optim.SGD nesterov=True)
  o.adam_b1, o.adam_b2, o.adam_eps = 0.9, 0.999, 1e-8  # 'adam' only: torch.optim.Adam defaults
  o.weight_decay = 0.001  # coupled L2 on every param incl. BN and biases (0.0005 x decay_mult 2)
  o.lr_mult_backbone = 1.0  # lr multiplier of the backbone (incl. its BN affine params)
  o.lr_mult_head = 10.0  # lr multiplier of the bottleneck and the classifier
  o.lr_mult_disc = 10.0  # lr multiplier of the discriminator
  o.lr_gamma = 0.001  # 'inv' schedule: lr_i = lr0 * (1 + lr_gamma * i) ** -lr_power, i = step
  o.lr_power = 0.75

  config.loss = lo = ml_collections.ConfigDict()
  lo.threshold = 0.9  # δ: a target row counts where its max softmax prob > threshold (strict)
  lo.trade_off = 1.0  # high end of the L_T weight ramp (λ_T -> trade_off)
  lo.adv_weight = 1.0  # weight of L_adv and of λ_T·L_T (DANN: of its domain loss)
  # Ramp 2/(1 + exp(-alpha·i/max_steps)) - 1 for the GRL coefficient (at i + 1) and λ_T (at i).
  lo.ramp_alpha = 10.0
  lo.ramp_max_steps = 10000  # steps (the reference's max_iter; not the training length)

  # --- the loop (dsbn_jax/train.py) ---------------------------------------------------------------
  config.total_steps = 10000  # SGD steps (Office-Home 10k, Office-31 20k in the reference)
  config.eval_every_steps = 500  # steps between target evaluations (reference: 500)
  config.checkpoint_every_steps = 1000  # steps between orbax checkpoints (and at the end)
  config.keep_checkpoints = 3  # checkpoints kept in <workdir>/checkpoints (the newest ones)
  config.log_every_steps = 50  # steps between metric rows (metrics.jsonl, TensorBoard, progress)

  # --- data (configs/data.py) and sweeps (dsbn_jax/sweep.py) --------------------------------------
  config.data = data_lib.get_data_config("office_home")
  config.sweep = sw = ml_collections.ConfigDict()
  sw.tasks = ("Art->Clipart",)  # 'source->target' domain pairs
  sw.methods = ("alda_dsbn",)  # methods, run in this order
  sw.seeds = (0,)  # seeds per task and method
  return config
