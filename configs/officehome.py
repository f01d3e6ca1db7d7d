"""Office-Home (65 classes; Art 2427, Clipart 4365, Product 4439, Real_World 4357 images).

One task:  python -m dsbn_jax.main --config=configs/officehome.py \
               --config.data.source=Art --config.data.target=Clipart
All twelve tasks x methods x seeds (resumable):  bash run.sh officehome
  (= python -m dsbn_jax.sweep --config=configs/officehome.py --workdir=runs/officehome)
Needs: the Office-Home archive or folder in data/manual/office_home and torchvision's
resnet50-19c8e357.pth in data/weights/.
Published (best over evaluations, %): ALDA avg 66.6, the paper (ALDA+DSBN) avg 67.4; per task in
docs/reference.md §11. Our own figures: README.md, produced by the sweep command above.
Every field and its default: dsbn_jax/config_defaults.py.
"""

from dsbn_jax import config_defaults

DOMAINS = ("Art", "Clipart", "Product", "Real_World")


def get_config():
  config = config_defaults.get_config("office_home")
  config.data.source, config.data.target = "Art", "Clipart"
  config.model.num_classes = 65  # classes (also read from the dataset at run time)
  config.model.pretrained_path = "./data/weights/resnet50-19c8e357.pth"
  config.total_steps = 10000  # steps (reference stop_step for Office-Home)
  config.optim.lr0 = 1e-3  # every Office-Home task (reference)
  config.sweep.tasks = tuple(f"{s}->{t}" for s in DOMAINS for t in DOMAINS if s != t)
  # Methods, in this order. Registered (dsbn_jax/methods/, README "Methods"): source_only, dann,
  # alda, cdan, cdan_e, jan, mada, mcc, bnm, each also <name>_dsbn. The whole comparison, every
  # method with shared BN and with DSBN:
  #   bash run.sh officehome --methods=source_only,dann,alda,cdan,cdan_e,jan,mada,mcc,bnm \
  #       --bn=shared,dsbn
  config.sweep.methods = ("source_only", "dann", "alda", "alda_dsbn")
  config.sweep.bn = ("auto",)  # each method with its name's BN: alda shared, alda_dsbn DSBN
  config.sweep.seeds = (0, 1, 2)
  return config
