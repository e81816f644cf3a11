"""Pixels beyond 8-bit PNG and JPEG: TIFF files, deep pixel types scaled to uint8, header sizes, the size limit.

* **TIFF** (``.tif``, ``.tiff``) is read with tifffile (:func:`read_tiff`): the first series at full
  resolution (level 0 of a pyramid), which must be one 2-D image, grey or with up to 4 samples per pixel
  (contiguous or planar), of any integer, float or 1-bit type. A stack (Z, T or several pages) is an error. A
  compression tifffile cannot decode without optional codecs (LZW, JPEG) is decoded by OpenCV's libtiff.
* **Deep pixels -> uint8**, one rule wherever an image enters a model (training, ``ensemble``, ``predict``,
  ``load_ensemble``; :func:`to_uint8`): uint8 as is; 1-bit 0/255; 16-bit and every other integer or float type
  by the image's own min-max, ``round((v - min) * 255 / (max - min))`` over all its channels (a constant image
  gives 0).  UW-Madison's GI-tract PNGs are 16-bit with values up to a few thousand that differ per scan: a
  fixed ``/257`` would leave them a handful of grey levels, while the per-image stretch keeps 256 (the popular
  baseline's ``img / img.max()`` differs from it by an offset that the models' per-image normalisation
  removes).  Full-range 16-bit images (0..65535) come out as ``round(v / 257)``.
* **Size**: up to :data:`MAX_PIXELS` (2^30, OpenCV's own decoding limit) pixels; a 100-Mpx JPEG is fine (it
  takes its width x height x channels bytes).  Larger files are whole-slide images, out of scope: an error says
  to cut them into tiles first.  :func:`header_size` reads TIFF and JPEG sizes without decoding the pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image

from kagglecmr.utils.errors import DataError

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PIXELS = 1 << 30  # OpenCV's CV_IO_MAX_IMAGE_PIXELS default
SLIDE_HINT = "a whole-slide image is out of scope: cut it into tiles (PNG or TIFF files) first"
_BLOCK = 1 << 22  # elements scaled at once by to_uint8 (bounds its float32 temporary to 16 MB)


def is_tiff(path) -> bool:
    return Path(path).suffix.lower() in TIFF_SUFFIXES


def check_pixels(path, hw) -> None:
    """A :class:`DataError` for an image of more than :data:`MAX_PIXELS` pixels."""
    if int(hw[0]) * int(hw[1]) > MAX_PIXELS:
        raise DataError(f"{path}: {hw[1]}x{hw[0]} pixels, more than {MAX_PIXELS >> 20} Mpx; {SLIDE_HINT}")


def _image_axes(series, path) -> tuple[str, tuple[int, ...]]:
    axes, shape = series.axes, tuple(series.shape)
    ok = axes == "YX" or (axes in ("YXS", "YXC", "SYX", "CYX") and shape[axes.index(axes.strip("YX"))] <= 4)
    if not ok:
        raise DataError(f"{path}: TIFF holds {'x'.join(map(str, shape))} ({axes}), expected one 2-D image "
                        f"(grey or up to 4 channels); save each plane as its own file")
    return axes, shape


def read_tiff(path) -> np.ndarray:
    """A TIFF image as stored: ``[H, W]`` or ``[H, W, S]`` in the file's sample order (RGB), any pixel type
    (1-bit becomes uint8 0/255)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise DataError(f"{path}: not a readable TIFF (no image in it)")
            series = tif.series[0]
            axes, shape = _image_axes(series, path)
            check_pixels(path, [shape[axes.index("Y")], shape[axes.index("X")]])
            try:
                arr = series.asarray()
            except ValueError as exc:  # a compression without its codec (imagecodecs): OpenCV's libtiff
                arr = _cv2_tiff(path, exc)
                axes = "YXS" if arr.ndim == 3 else "YX"
    except DataError:
        raise
    except Exception as exc:  # tifffile's own errors and whatever a damaged file raises
        raise DataError(f"{path}: not a readable TIFF ({type(exc).__name__})") from None
    if axes[0] in "SC":
        arr = np.moveaxis(arr, 0, -1)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return np.ascontiguousarray(arr)


def _cv2_tiff(path: Path, why: Exception) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: TIFF compression not supported ({str(why).splitlines()[0][:120]})")
    if img.ndim == 3 and img.shape[2] >= 3:  # OpenCV's BGR(A) -> the file's RGB(A)
        img = img[:, :, [2, 1, 0, 3][: img.shape[2]]]
    return img


def to_uint8(img: np.ndarray, where) -> np.ndarray:
    """An image of any integer, float or bool type as uint8 (the module docstring's rule)."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    if img.dtype == bool:
        return img.astype(np.uint8) * 255
    if img.dtype.kind not in "uif":
        raise DataError(f"{where}: unsupported pixel type {img.dtype}")
    if img.size == 0:
        return np.zeros(img.shape, np.uint8)
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise DataError(f"{where}: pixel values include NaN or infinity")
    lo, hi = float(img.min()), float(img.max())
    out = np.zeros(img.shape, np.uint8)
    if hi <= lo:
        return out
    scale = 255.0 / (hi - lo)
    flat, dst = img.reshape(-1), out.reshape(-1)
    for s in range(0, flat.size, _BLOCK):  # block by block: no whole-image float copy
        x = flat[s:s + _BLOCK].astype(np.float64 if img.dtype.itemsize > 2 else np.float32)
        dst[s:s + _BLOCK] = np.rint((x - lo) * scale)
    return out


def header_size(path) -> tuple[int, int] | None:
    """``(H, W)`` from a TIFF's or another image file's header (no pixels decoded); None when unknown."""
    path = Path(path)
    if is_tiff(path):
        try:
            with tifffile.TiffFile(path) as tif:
                axes, shape = _image_axes(tif.series[0], path)
                return shape[axes.index("Y")], shape[axes.index("X")]
        except DataError:
            raise
        except Exception:
            return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # lazy: the header only
                w, h = im.size
        return h, w
    except Exception:  # not a format PIL knows (or one it calls a decompression bomb): decode to tell
        return None
