"""Image sources and the sharded, resumable image → record job runner.

Sources (random access, picklable, so they also feed Grain workers); ``source[i]`` is
``{"name": str, "label": int, ...payload}``:

* ``ImageFolderSource(root)``: torchvision ``ImageFolder`` order — class folders
  sorted by name give the labels (sorted synset folders = the standard ImageNet
  order), files are listed per class with ``os.walk`` (sorted directories, sorted
  names) and kept when their extension is an image extension (case-insensitive).
  Payload: ``path``.
* ``TfdsSource(name, split, ...)``: a TFDS dataset through ``builder.as_data_source``
  (ArrayRecord), with the image feature left *encoded* so that it is decoded by PIL,
  as the reference's loader does. A dataset that needs a manual download
  (``imagenet2012``: the two ILSVRC tars) is prepared from ``manual_dir`` on first
  use; nothing is ever downloaded. ``tensorflow_datasets`` is imported only here.
  Payload: ``data`` (encoded bytes) or ``array`` (an already decoded image).

``open_image`` turns an element into an RGB PIL image (grayscale, palette, CMYK, RGBA
… are converted with ``convert("RGB")`` like torchvision's loader); anything PIL cannot
read raises ``BadImageError`` naming the image.

``run_sharded_job`` is the machinery shared by ``--mode=encode`` and
``--mode=extract``: images ``[s·R, (s+1)·R)`` go to shard ``s`` (R records per shard);
process ``p`` of ``P`` handles the shards ``s ≡ p (mod P)`` with its own devices; an
unreadable image is reported by name and skipped; a shard is written atomically
(temporary file, then rename) and then marked finished by ``<shard>.done.json``, so a
rerun keeps finished shards and redoes the others. Shard contents depend only on the
source and the image indices, never on the process count or on how often the job was
interrupted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import glob
import io
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from PIL import Image

from sfd_jax.core import checks, files, optional, options, progress
from sfd_jax.core.errors import ConfigError, DataError, MissingFileError, OutputExistsError
from sfd_jax.data import preprocess
from sfd_jax.data import records
from sfd_jax.parallel.multihost import process_barrier

# torchvision's IMG_EXTENSIONS.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SOURCE_KINDS = ("folder", "tfds")
JOB_FILE = "job.json"
DONE_SUFFIX = ".done.json"


class BadImageError(DataError):
  """An image that cannot be decoded; ``name`` identifies it, ``reason`` says why."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"unreadable image {name}: {reason}")
    self.name = name
    self.reason = reason


# ------------------------------------------------------------------------ sources


class ImageFolderSource:
  """``root/<class>/**/<image>`` in torchvision ``ImageFolder`` order."""

  def __init__(self, root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS):
    self.root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(self.root):
      raise MissingFileError(f"image folder {self.root} not found (expected one "
                              "sub-folder per class)")
    exts = tuple(e.lower() for e in extensions)
    self.classes = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
    if not self.classes:
      raise MissingFileError(f"image folder {self.root} has no class sub-folders")
    self._names: list[str] = []
    self._labels: list[int] = []
    for label, cls in enumerate(self.classes):
      for dirpath, _, names in sorted(os.walk(os.path.join(self.root, cls), followlinks=True)):
        for fname in sorted(names):
          if fname.lower().endswith(exts):
            self._names.append(os.path.relpath(os.path.join(dirpath, fname), self.root))
            self._labels.append(label)
    if not self._names:
      raise MissingFileError(f"image folder {self.root}: no files with extensions {exts}")

  def __len__(self) -> int:
    return len(self._names)

  def __getitem__(self, index: int) -> dict[str, Any]:
    name = self._names[int(index)]
    return {"name": name, "label": self._labels[int(index)],
            "path": os.path.join(self.root, name)}

  def describe(self) -> dict[str, Any]:
    return {"kind": "folder", "root": self.root, "num_images": len(self),
            "num_classes": len(self.classes)}


def _import_tfds():
  return optional.require("tensorflow_datasets", extra="tf",
                          purpose="config.data.source='tfds'")


class TfdsSource:
  """A TFDS split as a random-access source (ArrayRecord files, images left encoded).

  Args:
    name: TFDS dataset name, e.g. ``imagenet2012``.
    split: split spec, e.g. ``train`` or ``validation[:500]``.
    data_dir: TFDS data directory (default: TFDS's own default).
    manual_dir: folder with the manually downloaded files (ImageNet: the two
      ILSVRC2012 tars); used to prepare the dataset once when it is not prepared yet.
    image_key, label_key, name_key: feature names (``name_key`` may be absent from
      the dataset; the element index then names the image).
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               manual_dir: str | None = None, image_key: str = "image",
               label_key: str = "label", name_key: str = "file_name"):
    tfds = _import_tfds()
    self.name, self.split = name, split
    self.image_key, self.label_key, self.name_key = image_key, label_key, name_key
    builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
    if not builder.is_prepared():
      if not getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        raise MissingFileError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir} and downloads are "
            "disabled; prepare it first (tfds build --file_format=array_record)")
      if not manual_dir:
        raise MissingFileError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}: set the manual "
            f"download folder (data.tfds_manual_dir). {builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      logging.info("preparing TFDS %s from %s (once)", name, manual_dir)
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir,
                                                       try_download_gcs=False))
    features = builder.info.features
    if image_key not in features or label_key not in features:
      raise KeyError(f"TFDS {name}: features {sorted(features)} lack '{image_key}' or "
                     f"'{label_key}'")
    self._has_name = name_key in features
    self._source = builder.as_data_source(
        split, decoders={image_key: tfds.decode.SkipDecoding()})
    self.num_classes = int(getattr(features[label_key], "num_classes", 0) or 0)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[int(index)]
    name = ex[self.name_key] if self._has_name else None
    if isinstance(name, np.ndarray):
      name = name.item()
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    image = ex[self.image_key]
    out = {"name": name or f"{self.name}/{self.split}[{int(index)}]",
           "label": int(ex[self.label_key])}
    if isinstance(image, (bytes, np.bytes_)):
      out["data"] = bytes(image)
    else:
      out["array"] = np.asarray(image)
    return out

  def describe(self) -> dict[str, Any]:
    return {"kind": "tfds", "name": self.name, "split": self.split, "num_images": len(self),
            "num_classes": self.num_classes}


def make_source(cfg: Mapping[str, Any]):
  """Builds the source described by a config section.

  Fields: ``source`` ("folder" | "tfds"), ``path`` (folder root), ``tfds_name``,
  ``tfds_split``, ``tfds_data_dir``, ``tfds_manual_dir``.
  """
  kind = cfg.get("source", "folder")
  if kind == "folder":
    if not cfg.get("path"):
      raise ConfigError("config.data.path is empty: point it at a folder of class "
                        "sub-folders (one per class)")
    return ImageFolderSource(cfg["path"])
  if kind == "tfds":
    return TfdsSource(cfg.get("tfds_name") or "imagenet2012", cfg.get("tfds_split") or "train",
                      data_dir=cfg.get("tfds_data_dir") or None,
                      manual_dir=cfg.get("tfds_manual_dir") or None)
  raise ConfigError(f"config.data.source {kind!r} not one of {SOURCE_KINDS}: use 'folder' "
                    "(an image folder of class sub-folders) or 'tfds'")


def validate_job_config(config, section: str) -> None:
  """A data job's config (``config.<section>``: ``encode`` or ``extract``, and
  ``config.job`` / ``config.data``): every field against its declaration
  (``core.options``), checked before any network is loaded."""
  checks.require_sections(config, (section, "job", "data"), mode=section,
                          example="configs/encode_imagenet.py")
  options.check(config, "encode")


def write_folder(root: str, images: np.ndarray, labels: np.ndarray) -> None:
  """uint8 [N, H, W, 3] images as ``root/<label>/<index>.png``: an image folder the
  sources above read (class ``c`` is label ``c`` for labels 0..9)."""
  for i, (img, label) in enumerate(zip(images, labels)):
    os.makedirs(os.path.join(root, str(label)), exist_ok=True)
    Image.fromarray(np.asarray(img)).save(os.path.join(root, str(label), f"{i:06d}.png"))


class Subset:
  """The first ``limit`` elements of a source (all when ``limit`` <= 0)."""

  def __init__(self, source, limit: int):
    self.source = source
    self.limit = len(source) if limit <= 0 else min(int(limit), len(source))

  def __len__(self) -> int:
    return self.limit

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= int(index) < self.limit:
      raise IndexError(f"image {index} out of range for {self.limit} images")
    return self.source[index]

  def describe(self) -> dict[str, Any]:
    return dict(self.source.describe(), num_images=self.limit)


def open_image(element: Mapping[str, Any]) -> Image.Image:
  """Decodes a source element into an RGB PIL image (fully loaded).

  Raises:
    BadImageError: naming the image, when it cannot be read or decoded.
  """
  name = element.get("name", "<image>")
  try:
    if "path" in element:
      with open(element["path"], "rb") as f:
        img = Image.open(io.BytesIO(f.read()))
    elif "data" in element:
      img = Image.open(io.BytesIO(element["data"]))
    elif "array" in element:
      arr = np.asarray(element["array"])
      img = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    else:
      raise KeyError("element has no 'path', 'data' or 'array'")
    img.load()
    img = preprocess.to_rgb(img)
    if min(img.size) < 1:
      raise ValueError(f"empty image of size {img.size}")
    return img
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure)
    raise BadImageError(name, f"{type(e).__name__}: {e}") from e


class CenterCropTransform:
  """Grain map: element → ``{"image": uint8 [S, S, 3] ADM crop, "label"}``, or ``None``
  (dropped by Grain) for an unreadable image, which is logged by name."""

  def __init__(self, image_size: int):
    self.image_size = int(image_size)

  def __call__(self, element: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
    try:
      img = open_image(element)
    except BadImageError as e:
      logging.warning("skipping %s", e)
      return None
    return {"image": preprocess.adm_center_crop(img, self.image_size),
            "label": np.int32(element["label"])}


# -------------------------------------------------------------- shard bookkeeping


@dataclasses.dataclass(frozen=True)
class ShardPlan:
  """Fixed assignment of image indices to shards: shard s holds [s·R, (s+1)·R)."""
  num_items: int
  per_shard: int

  def __post_init__(self):
    if self.num_items <= 0:
      raise ValueError(f"ShardPlan: no images to process (num_items={self.num_items})")
    if self.per_shard <= 0:
      raise ValueError(f"ShardPlan: records per shard must be positive, got {self.per_shard}")

  @property
  def num_shards(self) -> int:
    return math.ceil(self.num_items / self.per_shard)

  def bounds(self, shard: int) -> tuple[int, int]:
    start = shard * self.per_shard
    return start, min(start + self.per_shard, self.num_items)

  def file(self, shard: int) -> str:
    return records.shard_name(shard, self.num_shards)

  def owned(self, process_index: int, process_count: int) -> list[int]:
    """Shards of process ``process_index`` of ``process_count`` (round robin)."""
    return list(range(process_index, self.num_shards, process_count))


def check_job_manifest(directory: str, manifest: Mapping[str, Any]) -> None:
  """Writes ``job.json`` or checks that an existing one describes the same job.

  A rerun must use the same inputs and settings as the run whose shards it keeps.

  Raises:
    ValueError: naming the settings that differ from the recorded ones.
  """
  path = os.path.join(directory, JOB_FILE)
  manifest = json.loads(json.dumps(manifest, sort_keys=True, default=str))
  if os.path.exists(path):
    old = files.read_json(path, what="job manifest", error=DataError)
    diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
    if diff:
      detail = "; ".join(f"{k}: recorded {old.get(k)!r}, now {manifest.get(k)!r}"
                         for k in diff)
      raise OutputExistsError(f"{directory} holds the output of another job ({detail}). Use "
                              "a new output directory, or delete it to start over.")
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def done_path(directory: str, shard_file: str) -> str:
  return os.path.join(directory, shard_file + DONE_SUFFIX)


def read_done(directory: str, plan: ShardPlan, shard: int) -> dict[str, Any] | None:
  """The finish marker of ``shard`` if the shard is complete, else None.

  Complete means: the marker exists, names this shard's image range, and the shard
  file exists with exactly the recorded byte size (a truncated, replaced or deleted
  shard is redone).
  """
  file = plan.file(shard)
  path = done_path(directory, file)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      done = json.load(f)
  except ValueError:
    return None
  shard_path = os.path.join(directory, file)
  if (tuple(done.get("range", ())) != plan.bounds(shard) or not os.path.isfile(shard_path)
      or os.path.getsize(shard_path) != done.get("bytes")):
    return None
  return done


def _write_done(directory: str, file: str, done: Mapping[str, Any]) -> None:
  path = done_path(directory, file)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(done, f, indent=1)
  os.replace(tmp, path)


def unfinished_shards(directory: str, plan: ShardPlan) -> list[int]:
  """Shards without a valid finish marker (see ``read_done``)."""
  return [s for s in range(plan.num_shards) if read_done(directory, plan, s) is None]


def collect_done(directory: str, plan: ShardPlan) -> list[dict[str, Any]]:
  """Finish markers of all shards in order.

  Raises:
    RuntimeError: listing the shards that are not finished.
  """
  missing = unfinished_shards(directory, plan)
  if missing:
    raise RuntimeError(f"{directory}: {len(missing)} shard(s) not finished, e.g. "
                       f"{[plan.file(s) for s in missing[:5]]}; rerun the job to complete "
                       "them")
  return [read_done(directory, plan, s) for s in range(plan.num_shards)]


def prepare_output(directory: str, plan: ShardPlan, manifest: Mapping[str, Any],
                   index_files: Sequence[str]) -> None:
  """Checks (or records) the job manifest and hides an outdated index, on every process.

  Process 0 writes/checks ``job.json`` and, while some shard is unfinished, removes
  the dataset's ``index_files`` so that no reader takes an incomplete dataset for a
  complete one; the other processes check the manifest after it.
  """
  os.makedirs(directory, exist_ok=True)
  if jax.process_index() == 0:
    check_job_manifest(directory, manifest)
    if unfinished_shards(directory, plan):
      for name in index_files:
        path = os.path.join(directory, name)
        if os.path.exists(path):
          logging.info("removing %s until all shards are finished", path)
          os.remove(path)
  process_barrier(f"prepare_output:{os.path.basename(directory)}")
  if jax.process_index() != 0:
    check_job_manifest(directory, manifest)


def finished_shard_infos(done: Iterable[Mapping[str, Any]]) -> tuple[records.ShardInfo, ...]:
  """ShardInfos of the non-empty shards (a shard whose images were all unreadable is
  left out of the dataset listing)."""
  return tuple(records.ShardInfo(d["file"], int(d["num_records"]), int(d["bytes"]))
               for d in done if d["num_records"] > 0)


# --------------------------------------------------------------------- job runner


@dataclasses.dataclass
class JobResult:
  """What one process did: shards written now, shards found finished, images skipped."""
  written: list[int]
  kept: list[int]
  skipped: list[tuple[int, str, str]]   # (index, name, reason) of this run's shards
  stopped_early: bool


def _remove_own_temporaries(directory: str, file: str) -> None:
  for p in glob.glob(os.path.join(directory, glob.escape(file) + ".tmp-*")):
    os.remove(p)


def _prefetch(pool: concurrent.futures.Executor, fn: Callable, items: Iterable,
              window: int) -> Iterator:
  """``map(fn, items)`` on ``pool`` with at most ``window`` tasks in flight, in order."""
  pending: collections.deque = collections.deque()
  it = iter(items)
  for item in it:
    pending.append(pool.submit(fn, item))
    if len(pending) >= window:
      break
  while pending:
    yield pending.popleft().result()
    for item in it:
      pending.append(pool.submit(fn, item))
      break


class _ShardBatches:
  """Batches one shard's images for ``compute`` and writes the results in order.

  Keeps at most one device call in flight beyond the one being prepared, so the
  device works while the host decodes and writes.
  """

  def __init__(self, writer, batch_size: int, compute: Callable, to_records: Callable,
               on_batch: Callable[[int], None]):
    self.writer = writer
    self.batch_size = batch_size
    self.compute = compute
    self.to_records = to_records
    self.on_batch = on_batch
    self._pending: list[tuple[int, int, np.ndarray]] = []
    self._inflight: collections.deque = collections.deque()

  def add(self, index: int, label: int, array: np.ndarray) -> None:
    self._pending.append((index, label, array))
    if len(self._pending) == self.batch_size:
      self._dispatch()
      self._drain(keep=1)

  def finish(self) -> None:
    if self._pending:
      self._dispatch()
    self._drain(keep=0)

  def _dispatch(self) -> None:
    pending, self._pending = self._pending, []
    n = len(pending)
    images = np.stack([p[2] for p in pending])
    indices = np.asarray([p[0] for p in pending], np.int32)
    if n < self.batch_size:  # pad with copies of the last image; outputs dropped
      pad = self.batch_size - n
      images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
      indices = np.concatenate([indices, np.repeat(indices[-1:], pad)])
    self._inflight.append((self.compute(images, indices), n, [p[1] for p in pending]))

  def _drain(self, keep: int) -> None:
    while len(self._inflight) > keep:
      out, n, labels = self._inflight.popleft()
      out = jax.tree.map(lambda a, n=n: np.asarray(a)[:n], jax.device_get(out))
      for rec in self.to_records(out, labels):
        self.writer.write(rec)
      self.on_batch(n)


def run_sharded_job(source, directory: str, plan: ShardPlan, *, batch_size: int,
                    prepare: Callable[[Image.Image], np.ndarray],
                    compute: Callable[[np.ndarray, np.ndarray], Any],
                    to_records: Callable[[Any, list[int]], list[dict]],
                    open_writer: Callable[[str], Any], process_index: int = 0,
                    process_count: int = 1, decode_threads: int = 8,
                    prefetch_batches: int = 2, log_every_batches: int = 20,
                    stop_after_shards: int = -1, name: str = "job") -> JobResult:
  """Processes this process's unfinished shards.

  Args:
    source: random-access image source (``source[i]`` → element).
    directory: output directory (shards, finish markers).
    plan: image → shard assignment.
    batch_size: images per device call; a shard's last batch is padded with copies
      of its last image (their outputs are dropped).
    prepare: host-side preprocessing of one RGB PIL image → array (runs in
      ``decode_threads`` threads).
    compute: ``compute(images [B, ...], indices int32 [B]) -> pytree of arrays``
      (device arrays: one call stays in flight while the next batch is prepared).
    to_records: ``to_records(outputs, labels)`` → the record dicts of the ``n`` real
      images of a batch (``outputs``: ``compute``'s pytree as numpy, leading size ``n``).
    open_writer: ``open_writer(path)`` → an atomic shard writer (``write``, ``close``
      returning a ``ShardInfo``, ``abort``).
    process_index, process_count: this process's slot; it handles the shards
      ``s ≡ process_index (mod process_count)``.
    decode_threads: host threads reading and preprocessing images.
    prefetch_batches: batches of images decoded ahead.
    log_every_batches: without a terminal, also a progress line every that many batches
      (besides every 10 % and 30 s; 0: only those); on a terminal a progress bar.
    stop_after_shards: stop after writing this many shards (testing; -1 = never).
    name: job name for messages.
  """
  os.makedirs(directory, exist_ok=True)
  owned = plan.owned(process_index, process_count)
  kept = [s for s in owned if read_done(directory, plan, s) is not None]
  todo = [s for s in owned if s not in kept]
  total_images = sum(plan.bounds(s)[1] - plan.bounds(s)[0] for s in todo)
  logging.info("%s: process %d/%d owns %d of %d shards: %d finished, %d to do (%d images)",
               name, process_index, process_count, len(owned), plan.num_shards, len(kept),
               len(todo), total_images)
  result = JobResult(written=[], kept=kept, skipped=[], stopped_early=False)
  if not todo:
    return result

  def load(item):
    shard, index = item
    element = source[index]
    try:
      return shard, index, int(element["label"]), prepare(open_image(element)), None
    except BadImageError as e:
      return shard, index, int(element["label"]), None, e

  items = ((s, i) for s in todo for i in range(*plan.bounds(s)))
  with progress.track(total_images, name, unit="img",
                      every_units=log_every_batches * batch_size or None) as bar, \
       concurrent.futures.ThreadPoolExecutor(max(1, decode_threads)) as pool:
    loaded = _prefetch(pool, load, items, max(1, prefetch_batches) * batch_size)
    for shard in todo:
      start, stop = plan.bounds(shard)
      file = plan.file(shard)
      bar.set_postfix(f"shard {file}")
      _remove_own_temporaries(directory, file)
      writer = open_writer(os.path.join(directory, file))
      skipped: list[tuple[int, str, str]] = []
      try:
        batches = _ShardBatches(writer, batch_size, compute, to_records, bar.update)
        for _ in range(start, stop):
          s, index, label, array, err = next(loaded)
          if s != shard:
            raise RuntimeError(f"{name}: image loader out of step (image {index} of shard "
                               f"{s} while writing shard {shard})")
          if err is not None:
            logging.warning("%s: skipping %s", name, err)
            skipped.append((index, err.name, err.reason))
            bar.update(1)                      # an unreadable image counts as done
          else:
            batches.add(index, label, array)
        batches.finish()
        info = writer.close()
      except BaseException:
        writer.abort()
        raise
      _write_done(directory, file, {
          "file": file, "range": [start, stop], "num_records": info.num_records,
          "bytes": info.num_bytes, "skipped": [list(x) for x in skipped]})
      result.written.append(shard)
      result.skipped.extend(skipped)
      logging.info("%s: wrote %s (%d records, %d unreadable image(s) skipped)", name, file,
                   info.num_records, len(skipped))
      if 0 <= stop_after_shards <= len(result.written) and shard != todo[-1]:
        result.stopped_early = True
        logging.warning("%s: stopping after %d shard(s) as configured", name,
                        len(result.written))
        break
  logging.info("%s: process %d wrote %d shard(s), %d images at %.1f img/s", name,
               process_index, len(result.written), bar.n, bar.rate)
  return result


def skipped_images(done: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """All unreadable images recorded in the finish markers, in index order."""
  out = []
  for d in done:
    for index, name, reason in d.get("skipped", []):
      out.append({"index": int(index), "name": name, "reason": reason})
  return out


def finish_job(workdir: str, plan: ShardPlan, source,
               result: JobResult, name: str, write_index) -> dict[str, Any]:
  """Waits for every process, then (process 0) lists the shards and reports.

  ``write_index(shard_infos, metadata)`` writes the dataset's index file; it runs on
  process 0 once all shards are finished and returns a dict of extra summary entries.
  Returns ``{"complete", "num_records", "skipped", ...}``; ``complete`` is False on
  processes other than 0 and while some shard is unfinished (a process stopped early).
  """
  process_barrier(f"{name}_done")
  incomplete = {"complete": False, "num_records": 0, "skipped": []}
  if jax.process_index() != 0:
    return incomplete
  missing = unfinished_shards(workdir, plan)
  if missing:
    logging.warning("%s: %d of %d shards unfinished (e.g. %s); rerun the same command to "
                    "complete %s", name, len(missing), plan.num_shards,
                    plan.file(missing[0]), workdir)
    return incomplete
  done = collect_done(workdir, plan)
  skipped = skipped_images(done)
  shards = finished_shard_infos(done)
  n = sum(s.num_records for s in shards)
  if n == 0:
    raise RuntimeError(f"{name}: no image of {source.describe()} could be read")
  extra = write_index(shards, {"source": source.describe(), "skipped_images": skipped})
  if skipped:
    logging.warning("%s: %d unreadable image(s) skipped: %s", name, len(skipped),
                    ", ".join(s["name"] for s in skipped[:20])
                    + (" ..." if len(skipped) > 20 else ""))
  logging.info("%s: finished %s: %d records in %d shards, %d unreadable image(s) skipped",
               name, workdir, n, len(shards), len(skipped))
  return dict({"complete": True, "num_records": n, "skipped": skipped}, **(extra or {}))
