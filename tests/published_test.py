"""dsbn_jax/published.py against docs/reference.md §11, the human-readable source it is typed from.

The section's tables are parsed (the per-task Office-31 and Office-Home tables, whose columns are
the published rows, and the comparison methods' averages table, whose rows are): every number of
the code must be the doc's at the same dataset, row and task, no number of the doc's tables may be
missing from the code, and the two tables that both give a number (CDAN+E's Office-31 average)
must agree. So the code and the doc cannot drift apart.
"""

import os
import re

import pytest

from dsbn_jax import published
from tests import suite_env

DOC = os.path.join(suite_env.ROOT, "docs", "reference.md")
_NUMBER = re.compile(r"^(\d+\.\d)(?: ± (\d+\.\d))?$")


def _section_11() -> str:
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  start = text.index('<a id="published-numbers"></a>')
  return text[start : text.index("<a id=", start + 1)]


def _tables(text: str) -> list[list[list[str]]]:
  """Every Markdown table of ``text``: its rows (the header first, the |---| line dropped), each a
  list of cells."""
  tables, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if not all(set(c) <= set("-:") for c in cells):
        current.append(cells)
    elif current:
      tables.append(current)
      current = []
  return tables


def _value(cell: str):
  """A cell as published.Row holds it: a float, (mean, std), None for '–'; the string otherwise."""
  cell = cell.replace("**", "").strip()
  if cell == "–":
    return None
  m = _NUMBER.match(cell)
  if not m:
    return cell
  return (float(m[1]), float(m[2])) if m[2] else float(m[1])


def doc_numbers() -> dict:
  """``{(dataset, row name, task or 'Avg'): {values}}`` of docs/reference.md §11's tables."""
  found = {}
  avg_columns = {f"{title} Avg": ds for ds, title in published.TITLES.items()}
  for table in _tables(_section_11()):
    header, rows = table[0], table[1:]
    if header[0] == "task":  # per task: a column per published row
      tasks = tuple(r[0].split(" (")[0] for r in rows)  # "Pr→Ar (printed "Pr→Rw")" -> Pr→Ar
      datasets = [ds for ds, t in published.TASKS.items() if tasks == (*t, published.AVG)]
      assert len(datasets) == 1, (
        f"a §11 table of tasks {tasks} is no dataset's, in the papers' order"
      )
      for r, task in zip(rows, tasks):
        for name, cell in zip(header[1:], r[1:]):
          found.setdefault((datasets[0], name, task), set()).add(_value(cell))
    elif header[0] == "method":  # the averages table: a row per published row
      assert set(avg_columns) <= set(header), header
      for r in rows:
        for column, cell in zip(header[1:], r[1:]):
          if column in avg_columns and _value(cell) is not None:
            found.setdefault((avg_columns[column], r[0], published.AVG), set()).add(_value(cell))
    else:
      raise AssertionError(f"a §11 table this test does not read: {header}")
  return found


def test_every_published_number_is_the_docs_and_none_is_missing():
  doc = doc_numbers()
  assert len(doc) > 100  # both per-task tables and the averages table were read
  inconsistent = {k: v for k, v in doc.items() if len(v) > 1}
  assert not inconsistent, f"docs/reference.md §11 gives two values: {inconsistent}"
  code = {}
  for ds, rows in published.ROWS.items():
    for row in rows:
      for task, value in zip((*published.TASKS[ds], published.AVG), row.cells, strict=True):
        if value is not None:
          code[(ds, row.doc, task)] = value
  assert {k: {v} for k, v in code.items()} == doc


@pytest.mark.parametrize("dataset", list(published.ROWS))
def test_each_published_average_is_the_mean_of_its_tasks(dataset):
  """A typo in a task (in the doc and, through the test above, the code) moves the mean of the
  tasks away from the published average by more than their rounding (±0.05 each, ±0.05 the Avg)."""
  for row in published.ROWS[dataset]:
    *tasks, avg = (v[0] if isinstance(v, tuple) else v for v in row.cells)
    if None not in tasks:
      assert abs(sum(tasks) / len(tasks) - avg) <= 0.1 + 1e-9, row.name


def test_task_labels_by_canonical_or_short_names_in_the_papers_order():
  assert published.TASKS["office31"] == ("A→W", "D→W", "W→D", "A→D", "D→A", "W→A")
  assert published.TASKS["office_home"] == (
    *("Ar→Cl", "Ar→Pr", "Ar→Rw", "Cl→Ar", "Cl→Pr", "Cl→Rw"),
    *("Pr→Ar", "Pr→Cl", "Pr→Rw", "Rw→Ar", "Rw→Cl", "Rw→Pr"),
  )
  assert published.task_label("office31", "amazon", "webcam") == "A→W"
  assert published.task_label("office31", "D", "amazon") == "D→A"
  assert published.task_label("office_home", "Real_World", "Pr") == "Rw→Pr"
  assert published.task_label("office31", "amazon", "amazon") is None  # not a paper task
  assert published.task_label("office31", "Art", "Clipart") is None  # another dataset's
  assert published.task_label("digits", "digits", "digits_m") is None
  assert published.fmt((95.6, 0.5)) == "95.6 ± 0.5" and published.fmt(None) == "–"
  assert published.fmt(100.0) == "100.0"
