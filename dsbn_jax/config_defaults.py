"""Every config field, with its default, meaning and unit: what the files in ``configs/`` start from.

``get_config(dataset)`` is a whole config for ``dataset``: the ALDA + DSBN recipe on ResNet-50 with
the official ALDA Office hyper-parameters for 'office31', 'office_home' and 'custom', our SmallCNN
recipe for 'digits' (the embedded Digits -> Digits-M default). ``get_data_config(dataset)`` is its
``data`` section alone. The experiment configs (``configs/officehome.py``, ...: the files
``--config=`` names) import this module and override a few fields:

  from dsbn_jax import config_defaults

  def get_config():
    config = config_defaults.get_config("office_home")
    config.total_steps = 10000
    ...

The Office values follow the official ALDA code (``train.py`` ``__main__``, ``train.sh``,
``pre_process.py``; docs/reference.md §1-§6) unless a comment says otherwise.
"""

import ml_collections

DATASETS = ("digits", "office31", "office_home", "custom")  # = datasets.catalog.DATASETS
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision Normalize mean, the reference's image_train
IMAGENET_STD = (0.229, 0.224, 0.225)

_DOMAINS = {  # default (source, target) per dataset
  "digits": ("digits", "digits_m"),
  "office31": ("amazon", "webcam"),
  "office_home": ("Art", "Clipart"),
  "custom": ("", ""),
}


def _check(dataset: str) -> None:
  if dataset not in _DOMAINS:
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")


def get_config(dataset: str = "office_home") -> ml_collections.ConfigDict:
  """Every field, with its meaning and unit, for ``dataset`` (see the module docstring)."""
  _check(dataset)
  config = ml_collections.ConfigDict()
  # Training method (dsbn_jax/methods/: the registry, one module per method): 'source_only' (CE on
  # the source only; the target never enters the network), 'dann' (DANN's domain loss, 1-logit D,
  # GRL), 'alda' (ALDA), 'cdan' / 'cdan_e' (CDAN, CDAN+E: DANN's D on the multilinear map of
  # features and softmax; +E weights it by the prediction entropy), 'jan' (joint MMD), 'mada' (K
  # class-wise discriminators), 'mcc' (minimum class confusion), 'bnm' (batch nuclear-norm
  # maximisation); docs/reference.md §12-§16. Its BN is model.bn; '<method>_dsbn' names the
  # method with domain-specific BN (e.g. 'alda_dsbn', ALDA with DSBN: the paper's method;
  # 'dann_dsbn'), the names runs had before model.bn, and the display name of such a pair in
  # sweeps, tables and results.json.
  config.method = "alda_dsbn"
  config.seed = 0  # PRNG seed for init and dropout (int)
  # Images per domain per step, global over all devices: 36 source + 36 target (reference). Any
  # device count takes it: a batch that does not divide is padded with masked rows that enter no
  # statistic, loss, metric or gradient (the maths of one device; sharding.padded_batch_size).
  config.batch_size = 36

  config.model = m = ml_collections.ConfigDict()
  m.backbone = "resnet50"  # 'resnet50' | 'resnet' (generic bottleneck ResNet below) | 'small_cnn'
  m.stage_sizes = (3, 4, 6, 3)  # 'resnet' only: bottleneck blocks per stage
  m.num_filters = 64  # 'resnet' only: stem/first-stage width (channels); x2 per stage, x4 output
  m.feature_dim = 500  # 'small_cnn' only: width of its last fc layer (features)
  m.num_classes = 65  # K: output classes (read from the dataset at run time)
  # BN of the backbone, for any method: 'shared' (one BN for both domains) | 'dsbn' (domain-specific
  # BN: source branch 0, target branch 1, each with its own statistics and affine; evaluation uses
  # the target's) | 'auto' (the method name's: 'dsbn' for '<method>_dsbn', else 'shared'). An
  # explicit value that contradicts a '_dsbn' name (alda_dsbn with 'shared') is an error.
  # (source_only with 'dsbn' is refused: the target never enters its network, so that branch would
  # be evaluated untrained.)
  m.bn = "auto"
  m.bottleneck_dim = 512  # bottleneck Linear width (features); 0 = no bottleneck layer
  m.disc_hidden_dim = 1024  # discriminator hidden width (units), both hidden layers
  m.dropout_rate = 0.5  # discriminator dropout probability; 0 disables dropout
  # d, the width of CDAN's randomized map (loss.cdan_randomized): the fixed N(0, 1) matrices are
  # F x d and K x d, D reads d features. 1024: the official RandomLayer's.
  m.random_dim = 1024
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
  o.lr0 = 0.001  # base learning rate (backbone) of every task without an entry below
  # Per-task base learning rates: {'source->target': lr0}, domains in any spelling the dataset
  # accepts ('A->D'); e.g. Office-31's A->D and D->W (configs/office31.py). A run resolves its rate
  # once: the config.json it writes holds it in lr0, and this table empty.
  o.lr0_per_task = {}
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
  # Weight of every method's transfer loss: ALDA's L_adv and λ_T·L_T, DANN's and CDAN(+E)'s domain
  # loss, MADA's (times mada_weight), JAN's JMMD, MCC's and BNM's losses. 1.0: each reference's.
  lo.adv_weight = 1.0
  # CDAN / CDAN+E: D reads the randomized map (f R_f / sqrt(d)) ⊙ (g R_g), d = model.random_dim,
  # instead of the multilinear map vec(g ⊗ f) of K·F features (the official --random; False, the
  # official default; worth it when K·F is large: 65 x 512 on Office-Home).
  lo.cdan_randomized = False
  # MADA: the weight of each class-wise discriminator's loss in the sum of the K (the Caffe
  # prototxt's loss_weight 0.3 on each D_k); transfer = adv_weight·mada_weight·Σ_k L_k.
  lo.mada_weight = 0.3
  # MCC: temperature T of the target softmax(z / T) (> 0). 2.5: the official Office value; the
  # official VisDA value is 3.0.
  lo.mcc_temperature = 2.5
  # Ramp 2/(1 + exp(-alpha·i/max_steps)) - 1 for the GRL coefficient (at i + 1), λ_T and CDAN+E's
  # entropy coefficient (at i).
  lo.ramp_alpha = 10.0
  lo.ramp_max_steps = 10000  # steps (the reference's max_iter; not the training length)

  # --- the loop (dsbn_jax/train.py) ---------------------------------------------------------------
  config.total_steps = 10000  # SGD steps (Office-Home 10k, Office-31 20k in the reference)
  config.eval_every_steps = 500  # steps between target evaluations (reference: 500)
  config.checkpoint_every_steps = 1000  # steps between orbax checkpoints (and at the end)
  config.keep_checkpoints = 3  # checkpoints kept in <workdir>/checkpoints (the newest ones)
  # A label-free validator (dsbn_jax/validators.py: source_accuracy, dev, entropy, info_max, snd,
  # bnm) whose pick among the evaluations is kept in <workdir>/checkpoints_selected for
  # `predict --checkpoint=selected`: a model chosen without target labels. '' = keep none (every
  # validator's pick is still recorded in results.json). source_accuracy and dev need
  # data.source_val_fraction > 0. (docs/model_selection.md)
  config.select_with = ""
  config.log_every_steps = 50  # steps between metric rows (metrics.jsonl, TensorBoard, progress)

  # --- data (get_data_config) and sweeps (dsbn_jax/sweep.py) --------------------------------------
  config.data = data = get_data_config(dataset)
  config.sweep = sw = ml_collections.ConfigDict()
  sw.tasks = (f"{data.source}->{data.target}",) if data.source else ()  # 'source->target' pairs
  sw.methods = ("alda_dsbn",)  # methods, run in this order (config.method's names)
  # BN choices, each method run with each, in this order (sweep --bn): 'auto' (the method name's,
  # or model.bn when set), 'shared', 'dsbn'; runs are named by display name (alda, alda_dsbn).
  sw.bn = ("auto",)
  sw.seeds = (0,)  # seeds per task and method
  if dataset == "digits":
    _digits_recipe(config)
  return config


def _digits_recipe(config: ml_collections.ConfigDict) -> None:
  """Digits -> Digits-M: our SmallCNN (with DSBN; 32x32 inputs, no crop) with the Office SGD recipe
  scaled to a short run, lr0 0.01 and every group at lr x1 (no x10 for the heads and D); from
  ALDA's digits code the threshold δ = 0.6 (README of the official code), D's hidden width 500 and
  the absence of a bottleneck. Not ALDA's digits setting (USPS/MNIST/SVHN with 256-d or 128-d
  nets, Adam, step decay; docs/reference.md §9): the numbers are not comparable with its table."""
  m = config.model
  m.backbone = "small_cnn"
  m.feature_dim = 500  # features (ours; ALDA's digits nets have 256-d or 128-d features)
  m.bottleneck_dim = 0  # features go straight to C and D, as the ALDA digits nets
  m.disc_hidden_dim = 500  # ALDA's digits discriminator width
  config.optim.lr0 = 0.01
  config.optim.lr_mult_head = 1.0
  config.optim.lr_mult_disc = 1.0
  config.loss.threshold = 0.6  # ALDA's digits δ
  config.loss.ramp_max_steps = 1000  # steps; the ramps reach ~1 by the end of a 1000-step run


def get_data_config(dataset: str = "digits") -> ml_collections.ConfigDict:
  """The ``data`` section for ``dataset`` ('digits' | 'office31' | 'office_home' | 'custom').

  Which dataset and domains, and how images are preprocessed. The Office values mirror the ALDA
  reference pipeline (docs/reference.md §6, ``pre_process.py``); Digits use 32x32 images and no
  crop. Override a few fields on the command line (``--config.data.source=Art``).
  """
  _check(dataset)
  office = dataset != "digits"
  data = ml_collections.ConfigDict()
  # --- what to read --------------------------------------------------------------------------
  data.dataset = dataset  # digits (builders digits, digits_m) | office31 | office_home | custom
  data.data_dir = "./data/tfds"  # where TFDS stores prepared datasets (None: ~/tensorflow_datasets)
  # Manual-download input: the archive or its extracted folder (office31, office_home), or the
  # root/<domain>/<class>/*.{jpg,png} tree itself (custom). Unused by digits (generated).
  data.manual_dir = {
    "office31": "./data/manual/office31",
    "office_home": "./data/manual/office_home",
  }.get(dataset, "")
  data.custom_name = ""  # custom: name of its prepared copies ('': the tree's folder name)
  # Derived, written by the run: the content digest of the custom tree it trains on (every image's
  # bytes, path and class; datasets/tree.py). A workdir never resumes on other content ('' for the
  # built-in datasets); a moved or copied tree has the same digest.
  data.dataset_digest = ""
  data.digits_seed = 0  # digits only: seed of the split partition and the Digits-M photo patches
  data.source = _DOMAINS[dataset][0]  # source domain (labelled): split name, any case, or "Ar"/"A"
  data.target = _DOMAINS[dataset][1]  # target domain (unlabelled in training, evaluated)
  # --- preprocessing (pixels) ------------------------------------------------------------------
  # px; first a square resize to this HxW, aspect distorted as the reference's ResizeImage (skipped
  # when the image already has this size)
  data.resize_size = 256 if office else 32
  data.crop_size = 224 if office else 0  # px; train RandomResizedCrop / eval crop size; 0 = no crop
  # Filter of the square resize: the reference calls PIL img.resize((256, 256)) without a filter,
  # i.e. BICUBIC with Pillow >= 7 (NEAREST with its pinned Pillow 5.3); TF resizes with antialias.
  data.resize_method = "bicubic"  # bicubic | bilinear | nearest | area | lanczos3 | lanczos5 | ...
  data.crop_scale = (0.08, 1.0)  # RandomResizedCrop area fraction range (torchvision default)
  data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio (w/h) range
  data.random_flip = office  # train: horizontal flip with probability 0.5 (never for digits)
  data.mean = IMAGENET_MEAN if office else (0.5, 0.5, 0.5)  # per RGB channel, on [0, 1] pixels
  data.std = IMAGENET_STD if office else (0.5, 0.5, 0.5)  # per RGB channel, on [0, 1] pixels
  # --- evaluation ------------------------------------------------------------------------------
  data.eval_mode = "10crop" if office else "center"  # 10crop (reference default) | center
  # Target split evaluated on: '' = the protocol's (digits: the held-out 'test' digits; Office: the
  # whole target domain, transductive as the reference). 'train' (digits) evaluates on the target
  # images adapted on, by their labels: for choosing hyper-parameters without the test split.
  data.eval_split = ""
  data.eval_batch_size = 32  # images per eval step over all processes (10 crops count as one)
  # Fraction of the source's training images held out of training as a labelled source validation
  # split (chosen by a hash of the file name: about this fraction of every class, the same images
  # on every run and process count). It feeds the source-accuracy and DEV validators (label-free
  # model selection, dsbn_jax/validators.py); 0 = none, the reference protocol (every source image
  # trains). The target-only validators (entropy, info_max, snd, bnm) need no split.
  data.source_val_fraction = 0.0
  # --- throughput --------------------------------------------------------------------------------
  data.num_parallel_calls = -1  # decode/augment threads per process; -1 = tf.data AUTOTUNE
  data.prefetch_batches = 2  # batches prepared ahead of the train/eval loop
  # Read every image decoded and square-resized from the prepared dataset's resized-image cache
  # (dsbn_jax/image_cache.py: uint8, S*S*3 bytes each, 0.9 GB for Office-Home Product at 256 px),
  # built once per dataset version and resize settings beside its records and memory-mapped by every
  # later run and process; training crops it, evaluation takes its crops from it. The same pixels as
  # decoding every time (False), about 4x fewer CPU cycles per image (the resize dominates).
  data.cache_resized = True
  # Where the train augmentation (RandomResizedCrop, flip, normalisation) runs: 'host' (tf.data on
  # the host's cores; float32 images cross to the devices), 'device' (the host gathers each step's
  # uint8 rows of the resized cache with their crop boxes and flips; the jitted step augments:
  # dsbn_jax/device_augment.py), 'resident' (both domains' resized caches are held on every device;
  # the host sends only row numbers, boxes and flips), 'auto' ('resident' on a GPU/TPU when both
  # domains' train images fit data.resident_max_gb, else 'device'; 'host' on a CPU). The same boxes
  # and flips on every path; the device's resize sums in another order: a pixel whose exact value
  # is within about 0.001 of a half may round one level (1/255) the other way.
  data.train_input = "auto"
  data.resident_max_gb = 4.0  # 'auto': the most uint8 resized train images kept on each device
  data.train_sharding = "global"  # global: every process keeps the domain's encoded bytes and takes
  #   its rows of one global, process-count independent stream | process: each process keeps and
  #   shuffles only its 1/process_count shard (less memory, stream depends on process count)
  return data
