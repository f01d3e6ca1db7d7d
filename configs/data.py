"""The `data` section of a config: which dataset and domains, and how images are preprocessed.

`get_data_config(name)` for name in 'digits' (the embedded default), 'office31', 'office_home' and
'custom'. Experiment configs nest it as ``config.data = data.get_data_config('office_home')`` and
override a few fields (``--config.data.source=Art --config.data.target=Clipart``). The Office
values mirror the ALDA reference pipeline (docs/reference.md §6, `pre_process.py`); Digits use
32x32 images and no crop.
"""

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision Normalize mean, the reference's image_train
IMAGENET_STD = (0.229, 0.224, 0.225)

_DOMAINS = {  # default (source, target) per dataset
    'digits': ('digits', 'digits_m'),
    'office31': ('amazon', 'webcam'),
    'office_home': ('Art', 'Clipart'),
    'custom': ('', ''),
}


def get_data_config(name: str = 'digits') -> ml_collections.ConfigDict:
  """The data section for `name` ('digits' | 'office31' | 'office_home' | 'custom')."""
  if name not in _DOMAINS:
    raise ValueError(f'unknown data config {name!r}; valid: {sorted(_DOMAINS)}')
  office = name != 'digits'
  data = ml_collections.ConfigDict()
  # --- what to read --------------------------------------------------------------------------
  data.dataset = name  # digits (builders digits, digits_m) | office31 | office_home | custom
  data.data_dir = './data/tfds'  # where TFDS stores prepared datasets (None: ~/tensorflow_datasets)
  # Manual-download input: the archive or its extracted folder (office31, office_home), or the
  # root/<domain>/<class>/*.{jpg,png} tree itself (custom). Unused by digits (generated).
  data.manual_dir = {'office31': './data/manual/office31',
                     'office_home': './data/manual/office_home'}.get(name, '')
  data.custom_name = ''  # custom: TFDS config name ('': the tree's folder name); new name = rebuild
  data.digits_seed = 0  # digits only: seed of the split partition and the Digits-M photo patches
  data.source = _DOMAINS[name][0]  # source domain (labelled): split name, any case, or "Ar"/"A"
  data.target = _DOMAINS[name][1]  # target domain (unlabelled in training, evaluated)
  # --- preprocessing (pixels) ------------------------------------------------------------------
  # px; first a square resize to this HxW, aspect distorted as the reference's ResizeImage (skipped
  # when the image already has this size)
  data.resize_size = 256 if office else 32
  data.crop_size = 224 if office else 0  # px; train RandomResizedCrop / eval crop size; 0 = no crop
  # Filter of the square resize: the reference calls PIL img.resize((256, 256)) without a filter,
  # i.e. BICUBIC with Pillow >= 7 (NEAREST with its pinned Pillow 5.3); TF resizes with antialias.
  data.resize_method = 'bicubic'  # bicubic | bilinear | nearest | area | lanczos3 | lanczos5 | ...
  data.crop_scale = (0.08, 1.0)  # RandomResizedCrop area fraction range (torchvision default)
  data.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect-ratio (w/h) range
  data.random_flip = office  # train: horizontal flip with probability 0.5 (never for digits)
  data.mean = IMAGENET_MEAN if office else (0.5, 0.5, 0.5)  # per RGB channel, on [0, 1] pixels
  data.std = IMAGENET_STD if office else (0.5, 0.5, 0.5)  # per RGB channel, on [0, 1] pixels
  # --- evaluation ------------------------------------------------------------------------------
  data.eval_mode = '10crop' if office else 'center'  # 10crop (reference default) | center
  # Target split evaluated on: '' = the protocol's (digits: the held-out 'test' digits; Office: the
  # whole target domain, transductive as the reference). 'train' (digits) evaluates on the target
  # images adapted on, by their labels: for choosing hyper-parameters without the test split.
  data.eval_split = ''
  data.eval_batch_size = 32  # images per eval step over all processes (10 crops count as one)
  # --- throughput --------------------------------------------------------------------------------
  data.num_parallel_calls = -1  # decode/augment threads per process; -1 = tf.data AUTOTUNE
  data.prefetch_batches = 2  # batches prepared ahead of the train/eval loop
  # Keep every training image decoded and square-resized in memory (uint8, S*S*3 bytes each: 0.9 GB
  # for Office-Home Product at 256 px), computed once when the stream starts: the same pixels, about
  # 4x fewer CPU cycles per image afterwards (the resize dominates).
  data.cache_resized = True
  data.train_sharding = 'global'  # global: every process keeps the domain's encoded bytes and takes
  #   its rows of one global, process-count independent stream | process: each process keeps and
  #   shuffles only its 1/process_count shard (less memory, stream depends on process count)
  return data
