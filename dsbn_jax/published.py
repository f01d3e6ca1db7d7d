"""Published target accuracies (%), printed beside a sweep's own rows in ``results.md``.

The one place in the code that holds published numbers. Every number is typed from
docs/reference.md §11 ("Published numbers"), the human-readable source, whose tables
``tests/published_test.py`` parses to check each number here (and that no row of those tables is
missing here): the two cannot drift. All are ResNet-50, best over evaluations on the whole target
domain (the papers' protocol, docs/reference.md §7), so they compare with a sweep's ``best``
column, not ``last``. Light: no JAX, no TensorFlow.
"""

import dataclasses

# The datasets whose sweeps get the paper's layout, as named in results.md and docs/reference.md.
TITLES = {"office31": "Office-31", "office_home": "Office-Home"}

# The papers' short domain names (their column labels) of our canonical domain names
# (dsbn_jax/datasets/office.py), and the tasks in the papers' column order.
DOMAINS = {
  "office31": {"amazon": "A", "dslr": "D", "webcam": "W"},
  "office_home": {"Art": "Ar", "Clipart": "Cl", "Product": "Pr", "Real_World": "Rw"},
}
TASKS = {
  "office31": ("A→W", "D→W", "W→D", "A→D", "D→A", "W→A"),
  "office_home": tuple(
    f"{s}→{t}" for s in ("Ar", "Cl", "Pr", "Rw") for t in ("Ar", "Cl", "Pr", "Rw") if s != t
  ),
}
AVG = "Avg"


@dataclasses.dataclass(frozen=True)
class Row:
  """One published row. ``cells``: per task of ``TASKS[dataset]``, then the average, a float, a
  ``(mean, std)`` pair, or None where the source publishes none."""

  name: str  # as results.md prints it
  doc: str  # its column (per-task tables) or row (averages table) in docs/reference.md §11
  ours: str  # the display name of our method it is the figure of ('': none of ours)
  source: str  # where the numbers come from, with the docs/reference.md section
  cells: tuple


def _avg_only(value: float | None, n: int) -> tuple:
  return (None,) * n + (value,)


_ALDA_TABLE = (
  "the ALDA paper's Office-31 table (official README `pics/pic2.png`), the same in the seed "
  "paper's (docs/reference.md §11)"
)
_ALDA_ONLY = (
  "the ALDA paper's Office-31 table (official README `pics/pic2.png`), a column the seed paper's "
  "lacks (docs/reference.md §11)"
)
_SEED = "the seed paper, ALDA + DSBN (AIRR 2023) (docs/reference.md §11)"
_SEED_HOME = (
  "the seed paper's Office-Home table, its three Pr→ rows relabelled (docs/reference.md §11)"
)
_ALDA_HOME = "a third-party table consistent with the ALDA paper (docs/reference.md §11)"
_CDAN = "the CDAN paper, as TLlib's README reports it (docs/reference.md §11, §12)"
_MCC = "the MCC paper (docs/reference.md §11, §15)"
_TLLIB = (
  "TLlib's README, its own setup: joint BN statistics, centre-crop test (docs/reference.md §11, "
  "§12-§15)"
)

_N31, _NHOME = len(TASKS["office31"]), len(TASKS["office_home"])

ROWS = {
  # docs/reference.md §11, the Office-31 table (A→W, D→W, W→D, A→D, D→A, W→A, Avg), then the
  # averages table.
  "office31": (
    Row(
      "ResNet-50 (source only)",
      "ResNet-50",
      "source_only",
      _ALDA_TABLE,
      (68.4, 96.7, 99.3, 68.9, 62.5, 60.7, 76.1),
    ),
    Row("DANN", "DANN", "dann", _ALDA_TABLE, (82.0, 96.9, 99.1, 79.7, 68.2, 67.4, 82.2)),
    Row("ADDA", "ADDA", "", _ALDA_TABLE, (86.2, 96.2, 98.4, 77.8, 69.5, 68.9, 82.9)),
    Row("JAN", "JAN", "jan", _ALDA_TABLE, (85.4, 97.4, 99.8, 84.7, 68.6, 70.0, 84.3)),
    Row("MADA", "MADA", "mada", _ALDA_TABLE, (90.0, 97.4, 99.6, 87.8, 70.3, 66.4, 85.2)),
    Row("CDAN+E", "CDAN+E", "cdan_e", _ALDA_ONLY, (94.1, 98.6, 100.0, 92.9, 71.0, 69.3, 87.7)),
    Row(
      "ALDA",
      "ALDA",
      "alda",
      _ALDA_TABLE,
      ((95.6, 0.5), (97.7, 0.1), (100.0, 0.0), (94.0, 0.4), (72.2, 0.4), (72.5, 0.2), 88.7),
    ),
    Row(
      "ALDA + DSBN (the paper)",
      "paper",
      "alda_dsbn",
      _SEED,
      (96.4, 97.5, 100.0, 96.4, 72.1, 73.8, 89.4),
    ),
    Row("MCC", "MCC", "mcc", _MCC, _avg_only(89.4, _N31)),
    Row("CDAN (TLlib)", "CDAN (TLlib)", "cdan", _TLLIB, _avg_only(87.7, _N31)),
    Row("JAN (TLlib)", "JAN (TLlib)", "jan", _TLLIB, _avg_only(87.0, _N31)),
    Row("MCC (TLlib)", "MCC (TLlib)", "mcc", _TLLIB, _avg_only(89.6, _N31)),
  ),
  # docs/reference.md §11, the Office-Home table (Ar→Cl ... Rw→Pr, Avg), then the averages table.
  "office_home": (
    Row(
      "ResNet-50 (source only)",
      "ResNet-50",
      "source_only",
      _SEED_HOME,
      (34.9, 50.0, 58.0, 37.4, 41.9, 46.2, 38.5, 31.2, 60.4, 53.9, 41.2, 59.9, 46.1),
    ),
    Row(
      "DANN",
      "DANN",
      "dann",
      _SEED_HOME,
      (45.6, 59.3, 70.1, 47.0, 58.5, 60.9, 46.1, 43.7, 68.5, 63.2, 51.8, 76.8, 57.6),
    ),
    Row(
      "JAN",
      "JAN",
      "jan",
      _SEED_HOME,
      (45.9, 61.2, 68.9, 50.4, 59.7, 61.0, 45.8, 43.4, 70.3, 63.9, 52.4, 76.8, 58.3),
    ),
    Row(
      "ALDA",
      "ALDA",
      "alda",
      _ALDA_HOME,
      (53.7, 70.1, 76.4, 60.2, 72.6, 71.5, 56.8, 51.9, 77.1, 70.2, 56.3, 82.1, 66.6),
    ),
    Row(
      "ALDA + DSBN (the paper)",
      "paper",
      "alda_dsbn",
      _SEED_HOME,
      (53.1, 68.5, 76.1, 65.3, 73.4, 72.6, 55.5, 53.9, 77.8, 72.6, 56.2, 84.3, 67.4),
    ),
    Row("CDAN+E", "CDAN+E", "cdan_e", _CDAN, _avg_only(65.8, _NHOME)),
    Row("CDAN (TLlib)", "CDAN (TLlib)", "cdan", _TLLIB, _avg_only(68.8, _NHOME)),
    Row("JAN (TLlib)", "JAN (TLlib)", "jan", _TLLIB, _avg_only(65.9, _NHOME)),
    Row("MCC (TLlib)", "MCC (TLlib)", "mcc", _TLLIB, _avg_only(72.4, _NHOME)),
  ),
}


def task_label(dataset: str, source: str, target: str) -> str | None:
  """The paper's column of the task ``source -> target`` of ``dataset`` (each domain by its
  canonical name or the paper's short one: ``amazon``/``A``), e.g. ``'A→W'``; None for a task
  that is not one of the paper's (or a dataset without a paper layout)."""
  short = DOMAINS.get(dataset, {})
  names = {**short, **{s: s for s in short.values()}}
  if source not in names or target not in names:
    return None
  label = f"{names[source]}→{names[target]}"
  return label if label in TASKS[dataset] else None


def fmt(value) -> str:
  """A published cell as results.md prints it (and docs/reference.md writes it)."""
  if value is None:
    return "–"
  if isinstance(value, tuple):
    return f"{value[0]:.1f} ± {value[1]:.1f}"
  return f"{value:.1f}"
