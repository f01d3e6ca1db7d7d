"""``predict`` reads images as training does and survives bad ones: same bytes -> pixels for every
format, the same decompression-bomb limit, unreadable files skipped with a reason, spreadsheet-safe
CSV cells, and bad flags refused before any work.

In-process and fast: no training run. ``predict.load_run`` is replaced by the digits data config
(32x32 centre evaluation) and a numpy "model" (in place of ``evaluation.predict_batches``: one
output per batch) whose probabilities are a function of the pixels it is given (and which records
them), so the tests see exactly what predict feeds a model. The real checkpoint path is covered by
``predict_checkpoint_test.py`` and ``silent_answers_test.py``.
"""

import csv
import io
import os
import resource
import struct
import time
import warnings
import zlib

import numpy as np
import PIL.Image
import pytest
import tensorflow as tf

from dsbn_jax import input_pipeline, predict
from dsbn_jax.cli import run_cli
from dsbn_jax.datasets import folder
from dsbn_jax.errors import UserError
from tests import data_fixtures as fx

CLASSES = ["red", "green", "blue"]


def _encode(array, mode, fmt):
  if mode == "RGB" and fmt != "JPEG":
    buf = io.BytesIO()
    PIL.Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()
  return fx.encode(array, mode, fmt)


# (id, file name, PIL mode, PIL format): every format the builders accept (the same modes as
# data_fixtures.MODES, and a TIFF named .png), and the extra extensions predict lists.
FORMATS = [
  ("jpeg_rgb", "a.jpg", "RGB", "JPEG"),
  ("jpeg_gray", "b.jpg", "L", "JPEG"),
  ("jpeg_cmyk", "c.jpeg", "CMYK", "JPEG"),
  ("png_rgb", "d.png", "RGB", "PNG"),
  ("png_rgba", "e.png", "RGBA", "PNG"),
  ("png_l", "f.png", "L", "PNG"),
  ("png_la", "g.png", "LA", "PNG"),
  ("png_p", "h.png", "P", "PNG"),
  ("png_1", "i.png", "1", "PNG"),
  ("png_16bit", "j.png", "I;16", "PNG"),
  ("tiff_named_png", "k.png", "RGB", "TIFF"),
  ("bmp", "l.bmp", "RGB", "BMP"),
  ("gif", "m.gif", "RGB", "GIF"),
  ("webp", "n.webp", "RGB", "WEBP"),
]


def _write_formats(root) -> list[str]:
  paths = []
  for k, (_, name, mode, fmt) in enumerate(FORMATS):
    path = os.path.join(root, name)
    with open(path, "wb") as f:
      f.write(_encode(fx.random_image(k, fx.SIZES[k % len(fx.SIZES)]), mode, fmt))
    paths.append(path)
  return paths


def bomb_png(width: int, height: int) -> bytes:
  """A valid 1-bit grayscale PNG, all black: small on disk for any size, written cheaply."""

  def chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  z = zlib.compressobj(9)
  rows = (b"\0" * (1 + (width + 7) // 8)) * min(height, 1000)
  body = [z.compress(rows) for _ in range(height // 1000)]
  body.append(z.compress(rows[: (height % 1000) * (1 + (width + 7) // 8)]) + z.flush())
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", header)
    + chunk(b"IDAT", b"".join(body))
    + chunk(b"IEND", b"")
  )


def _training_pixels(path):
  """What training decodes: the builders' stored bytes through the input pipeline."""
  return input_pipeline.decode_image(tf.constant(folder.read_image_bytes(path)[0])).numpy()


def _predict_pixels(path):
  """What predict decodes."""
  return input_pipeline.decode_image(tf.constant(predict.read_image(path))).numpy()


@pytest.fixture
def fake_run(monkeypatch):
  """Replaces load_run: the digits data config and a recording numpy model; returns its calls."""
  config = type("Config", (), {"data": fx.get_data_config("digits")})()
  calls = []

  def predictor(batch):
    calls.append({k: np.asarray(v) for k, v in batch.items()})
    means = batch["image"].reshape(len(batch["image"]), -1, 3).mean(axis=1)
    e = np.exp(8.0 * (means - means.max(axis=1, keepdims=True)))
    return {"probs": e / e.sum(axis=1, keepdims=True)}

  monkeypatch.setattr(
    predict,
    "load_run",
    lambda workdir, checkpoint: (config, CLASSES, lambda bs: map(predictor, bs)),
  )
  return config, calls


def _rows(out):
  with open(out, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# 1. One bytes normalisation for training and predict
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(FORMATS)), ids=[f[0] for f in FORMATS])
def test_predict_decodes_every_format_to_the_training_pixels(index, tmp_path):
  _, name, mode, fmt = FORMATS[index]
  path = str(tmp_path / name)
  with open(path, "wb") as f:
    f.write(_encode(fx.random_image(index, (23, 17)), mode, fmt))
  trained = _training_pixels(path)
  predicted = _predict_pixels(path)
  assert predicted.dtype == trained.dtype == np.uint8
  np.testing.assert_array_equal(predicted, trained)
  reference = np.asarray(PIL.Image.open(path).convert("RGB"))  # the reference's loader
  np.testing.assert_array_equal(predicted, reference)


def test_predict_folder_feeds_the_model_what_training_evaluates(tmp_path, fake_run):
  """End to end: the batches predict classifies are the training path's preprocessed pixels."""
  config, calls = fake_run
  (tmp_path / "images").mkdir()
  paths = sorted(_write_formats(tmp_path / "images"))
  n = predict.predict_folder(
    "unused", str(tmp_path / "images"), str(tmp_path / "p.csv"), batch_size=4
  )
  assert n == len(FORMATS)
  fed = np.concatenate([c["image"][c["mask"]] for c in calls])
  expected = np.stack(
    [
      input_pipeline.preprocess_eval(
        tf.constant(folder.read_image_bytes(p)[0]), config.data
      ).numpy()
      for p in paths
    ]
  )
  np.testing.assert_array_equal(fed, expected)
  rows = _rows(tmp_path / "p.csv")
  assert [r["path"] for r in rows] == [os.path.basename(p) for p in paths]
  assert all(r["prediction"] in CLASSES and r["error"] == "" for r in rows)


# --------------------------------------------------------------------------------------------
# 2. The same decompression-bomb limit on both paths
# --------------------------------------------------------------------------------------------


def test_a_huge_small_png_is_refused_by_both_paths_before_any_pixel_is_allocated(tmp_path):
  path = tmp_path / "bomb.png"
  path.write_bytes(bomb_png(20000, 20000))  # 400 MP (> 2 x PIL's 89.5 MP default limit)
  assert path.stat().st_size < 100_000
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  start = time.perf_counter()
  with pytest.raises(UserError, match=r"cannot read image .*bomb\.png \(DecompressionBombError"):
    folder.read_image_bytes(str(path))
  with pytest.raises(PIL.Image.DecompressionBombError):
    predict.read_image(str(path))
  assert time.perf_counter() - start < 5
  # A decode would need 400 MB (mode 1) and 1.2 GB as RGB; the peak RSS grows by far less.
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_kb < 150_000


def test_both_paths_apply_pils_max_image_pixels(tmp_path, monkeypatch):
  """The one limit is PIL.Image.MAX_IMAGE_PIXELS: lowered, both paths warn and refuse alike."""
  monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
  for side, outcome in ((30, "ok"), (40, "warn"), (64, "refuse")):  # 900, 1600, 4096 px
    path = str(tmp_path / f"{side}.png")
    with open(path, "wb") as f:
      f.write(bomb_png(side, side))
    for read in (lambda p: folder.read_image_bytes(p)[0], predict.read_image):
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if outcome == "refuse":
          with pytest.raises(
            (UserError, PIL.Image.DecompressionBombError),
            match="DecompressionBomb|decompression bomb",
          ):
            read(path)
          continue
        data = read(path)
      bombs = [w for w in caught if issubclass(w.category, PIL.Image.DecompressionBombWarning)]
      assert len(bombs) == (outcome == "warn"), (side, read)
      assert input_pipeline.decode_image(tf.constant(data)).shape == (side, side, 3)


# --------------------------------------------------------------------------------------------
# 3. Unreadable images are skipped with a reason; none readable is a one-line error
# --------------------------------------------------------------------------------------------


def _bad_files(root):
  jpeg = fx.encode(fx.random_image(5, (40, 30)), "RGB", "JPEG")
  (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
  (root / "garbage.jpg").write_bytes(b"this is not an image\n")
  (root / "bomb.png").write_bytes(bomb_png(20000, 20000))
  (root / "empty.png").write_bytes(b"")
  return {
    "truncated.jpg": "truncated",
    "garbage.jpg": "UnidentifiedImageError",
    "bomb.png": "DecompressionBombError",
    "empty.png": "UnidentifiedImageError",
  }


def test_unreadable_images_are_skipped_with_a_warning_and_a_csv_row(tmp_path, fake_run, capsys):
  good, mixed = tmp_path / "good", tmp_path / "mixed"
  for d in (good, mixed):
    d.mkdir()
    for i in range(3):
      fx.write_image(str(d / f"ok{i}.png"), fx.random_image(i, (32, 32)))
  bad = _bad_files(mixed)
  capsys.readouterr()
  assert predict.predict_folder("unused", str(good), str(tmp_path / "good.csv"), 2) == 3
  assert predict.predict_folder("unused", str(mixed), str(tmp_path / "mixed.csv"), 2) == 3
  err = capsys.readouterr().err
  rows = {r["path"]: r for r in _rows(tmp_path / "mixed.csv")}
  assert sorted(rows) == sorted([f"ok{i}.png" for i in range(3)] + list(bad))
  for name, reason in bad.items():
    assert rows[name]["prediction"] == rows[name]["probability"] == rows[name]["top5"] == ""
    assert reason.lower() in rows[name]["error"].lower(), (name, rows[name]["error"])
    assert "BytesIO" not in rows[name]["error"]
    assert f"warning: skipped {mixed / name}, it cannot be read as an image" in err
  assert "4 of 7 images could not be read and were skipped" in err
  assert [rows[r["path"]] for r in _rows(tmp_path / "good.csv")] == _rows(tmp_path / "good.csv")


def test_no_readable_image_is_a_one_line_error_and_no_csv(tmp_path, fake_run):
  images = tmp_path / "images"
  images.mkdir()
  _bad_files(images)
  out = tmp_path / "p.csv"
  with pytest.raises(UserError) as e:
    predict.predict_folder("unused", str(images), str(out))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("none of the 4 images under ")
  assert "no predictions written" in msg
  assert not out.exists() and not os.path.exists(f"{out}.tmp")


def test_a_predictions_csv_of_the_previous_version_may_be_replaced(tmp_path, fake_run):
  fx.write_image(str(tmp_path / "images" / "x.png"), fx.random_image(0, (32, 32)))
  out = tmp_path / "p.csv"
  out.write_text("path,prediction,probability,top5\r\nx.png,red,0.5,red:0.500\r\n")
  assert predict.predict_folder("unused", str(tmp_path / "images"), str(out)) == 1
  assert list(_rows(out)[0]) == ["path", "prediction", "probability", "top5", "error"]


# --------------------------------------------------------------------------------------------
# 4. Spreadsheet-safe cells
# --------------------------------------------------------------------------------------------

TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


@pytest.mark.parametrize("text", ["=1+1", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "'quoted"])
def test_spreadsheet_safe_prefixes_a_quote_and_is_undone_by_removing_it(text):
  safe = predict.spreadsheet_safe(text)
  assert safe == "'" + text and safe[1:] == text
  assert predict.spreadsheet_safe("plain=1") == "plain=1"


def test_csv_cells_from_user_names_never_start_a_formula(tmp_path, fake_run, monkeypatch):
  config, _ = fake_run
  classes = ["=HYPERLINK(\"http://x\")", "@cmd", "-1"]  # class names are folder names too
  monkeypatch.setattr(
    predict,
    "load_run",
    lambda w, c: (
      config,
      classes,
      lambda bs: ({"probs": np.tile([0.7, 0.2, 0.1], (len(batch["image"]), 1))} for batch in bs),
    ),
  )
  images = tmp_path / "images"
  names = [
    "=cmd|' /C calc'!A0.png",
    "+1.png",
    "-2.png",
    "@SUM(1).png",
    "\tx.png",
    "\rx.png",
    "'q.png",
    "plain.png",
    os.path.join("-dir", "x.png"),
  ]
  for i, name in enumerate(names):
    fx.write_image(str(images / name), fx.random_image(i, (32, 32)))
  (images / "=bad.jpg").write_bytes(b"not an image")
  names.append("=bad.jpg")
  assert predict.predict_folder("unused", str(images), str(tmp_path / "p.csv")) == len(names) - 1
  rows = _rows(tmp_path / "p.csv")
  for row in rows:
    for cell in row.values():
      assert not cell.startswith(TRIGGERS), row
  undo = lambda cell: cell[1:] if cell.startswith("'") else cell  # noqa: E731
  assert sorted(undo(r["path"]) for r in rows) == sorted(names)
  classified = [r for r in rows if r["prediction"]]
  assert {r["prediction"] for r in classified} == {"'=HYPERLINK(\"http://x\")"}
  assert all(r["top5"].startswith("'=HYPERLINK") for r in classified)
  assert [undo(r["top5"]) for r in classified][0].split(" ")[1:] == ["@cmd:0.200", "-1:0.100"]


# --------------------------------------------------------------------------------------------
# 5. Bad flags: one line, before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["out_is_a_folder", "batch_size_0"])
def test_bad_out_or_batch_size_is_a_one_line_error_before_any_work(
  case, tmp_path, monkeypatch, capsys
):
  def no_work(*args):
    raise AssertionError("work started")

  monkeypatch.setattr(predict, "load_run", no_work)
  monkeypatch.setattr(predict, "list_images", no_work)
  monkeypatch.setattr(predict, "read_image", no_work)
  out, batch = (str(tmp_path), 32) if case == "out_is_a_folder" else (str(tmp_path / "p.csv"), 0)
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(SystemExit) as e:
    run_cli(
      predict.predict_folder, str(tmp_path / "no_run"), str(tmp_path / "no_images"), out, batch
    )
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert (
    "is a folder" if case == "out_is_a_folder" else "invalid --batch_size=0; valid: an integer >= 1"
  ) in err
  assert sorted(os.listdir(tmp_path)) == before


def test_bytes_tensorflow_refuses_after_pil_read_them_are_skipped_too(
  tmp_path, fake_run, capsys, monkeypatch
):
  for i in range(2):
    fx.write_image(str(tmp_path / "images" / f"{i}.png"), fx.random_image(i, (32, 32)))
  read = predict.read_image
  monkeypatch.setattr(
    predict, "read_image", lambda p: b"\x89PNG broken" if p.endswith("1.png") else read(p)
  )
  assert predict.predict_folder("unused", str(tmp_path / "images"), str(tmp_path / "p.csv")) == 1
  rows = _rows(tmp_path / "p.csv")
  assert rows[0]["error"] == "" and rows[0]["prediction"] in CLASSES
  assert rows[1]["prediction"] == "" and rows[1]["error"].startswith("InvalidArgumentError: ")
  assert "{{" not in rows[1]["error"] and "skipped" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# A damaged run folder, a full disk
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "name,content",
  [
    ("config.json", '{"method": "alda'),
    ("config.json", "[1, 2]"),
    ("classes.json", '["a", "b"'),
    ("classes.json", '{"a": 1}'),
  ],
)
def test_a_damaged_config_or_classes_json_is_one_line_naming_it(tmp_path, name, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  (workdir / "classes.json").write_text('["a"]')
  (workdir / name).write_text(content)
  with pytest.raises(UserError) as e:
    predict.read_run_checkpoint(str(workdir))
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"{workdir / name} is damaged (")


def test_a_full_disk_while_writing_the_csv_names_it_and_leaves_no_tmp(
  tmp_path, fake_run, monkeypatch
):
  import errno

  images = tmp_path / "images"
  images.mkdir()
  (images / "a.png").write_bytes(_encode(fx.random_image(0, (20, 20)), "RGB", "PNG"))
  out = tmp_path / "p.csv"
  real_open = open

  def full_disk_open(path, mode="r", *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    if str(path).endswith(".tmp") and "w" in mode:

      def write(_):
        raise OSError(errno.ENOSPC, "No space left on device")

      f.write = write
    return f

  monkeypatch.setattr("builtins.open", full_disk_open)
  with pytest.raises(OSError) as e:
    predict.predict_folder("unused", str(images), str(out))
  monkeypatch.undo()
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
  assert not out.exists() and not os.path.exists(f"{out}.tmp")
