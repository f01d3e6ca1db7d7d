"""Office-31 (31 classes; amazon 2817, dslr 498, webcam 795 images), ALDA + DSBN on ResNet-50.

One task:  python -m dsbn_jax.main --config=configs/office31.py \
               --config.data.source=amazon --config.data.target=webcam
All six tasks x methods x seeds (resumable):  bash run.sh office31
  (= python -m dsbn_jax.sweep --config=configs/office31.py --workdir=runs/office31)
Needs: the Office-31 archive or folder in data/manual/office31 (see the builder's instructions) and
torchvision's resnet50-19c8e357.pth in data/weights/.
Published (best over evaluations, %): ALDA 95.6 / 97.7 / 100.0 / 94.0 / 72.2 / 72.5, avg 88.7;
the paper (ALDA+DSBN) 96.4 / 97.5 / 100.0 / 96.4 / 72.1 / 73.8, avg 89.4 (A→W, D→W, W→D, A→D, D→A,
W→A). Our own figures: README.md, produced by the sweep command above.
Every field and its default: dsbn_jax/config_defaults.py.
"""

from dsbn_jax import config_defaults


def get_config():
  config = config_defaults.get_config("office31")
  config.data.source, config.data.target = "amazon", "webcam"
  config.model.num_classes = 31  # classes (also read from the dataset at run time)
  config.model.pretrained_path = "./data/weights/resnet50-19c8e357.pth"
  # Reference (train.py __main__): stop_step 20000 for every Office-31 task; lr0 1e-3, but 3e-4
  # for A->D and D->W.
  config.total_steps = 20000  # steps
  config.optim.lr0 = 1e-3  # base learning rate of the tasks not listed below
  config.optim.lr0_per_task = {"amazon->dslr": 3e-4, "dslr->webcam": 3e-4}
  config.sweep.tasks = (
    "amazon->webcam",
    "dslr->webcam",
    "webcam->dslr",
    "amazon->dslr",
    "dslr->amazon",
    "webcam->amazon",
  )  # the papers' column order
  # Methods, in this order. Registered (dsbn_jax/methods/, README "Methods"): source_only, dann,
  # alda, cdan, cdan_e, jan, mada, mcc, bnm, each also <name>_dsbn. The whole comparison, every
  # method with shared BN and with DSBN:
  #   bash run.sh office31 --methods=source_only,dann,alda,cdan,cdan_e,jan,mada,mcc,bnm \
  #       --bn=shared,dsbn
  config.sweep.methods = ("source_only", "dann", "alda", "alda_dsbn")
  config.sweep.bn = ("auto",)  # each method with its name's BN: alda shared, alda_dsbn DSBN
  config.sweep.seeds = (0, 1, 2)
  return config
