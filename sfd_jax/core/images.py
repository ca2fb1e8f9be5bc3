"""uint8 image helpers: grids of tiles, reading a list of PNGs into one array."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from PIL import Image


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 0,
               pad_value: int = 0) -> np.ndarray:
  """uint8 [N, H, W, 3] → one uint8 grid image (row-major; ``pad`` pixels of
  ``pad_value`` between and around tiles; missing tiles black)."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for r in range(rows):
    for q in range(cols):
      y, x = pad + r * (h + pad), pad + q * (w + pad)
      i = r * cols + q
      grid[y:y + h, x:x + w] = images[i] if i < n else 0
  return grid


def class_grid(images: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
  """Class-balanced samples in index order (class of index i: i·K // N) → a grid with one
  row of the first ``per_class`` samples per class."""
  n = len(images)
  rows = [images[-(-c * n // num_classes):][:per_class] for c in range(num_classes)]
  return image_grid(np.concatenate(rows), cols=per_class, pad=1, pad_value=96)


def load_pngs(files: Sequence[str | os.PathLike]) -> np.ndarray:
  """uint8 [N, H, W, 3]: the images of ``files`` (converted to RGB), stacked in order."""
  return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def numbered_pngs(directory: str, n: int) -> list[str]:
  """``<directory>/{i:06d}.png`` for i < n (the sampling job's file names)."""
  return [os.path.join(directory, f"{i:06d}.png") for i in range(n)]


def save_png(image: np.ndarray, path: str) -> str:
  Image.fromarray(np.asarray(image)).save(path)
  return path
