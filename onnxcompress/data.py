"""Calibration and validation data.

Format (``.npz``), documented in README:

* ``<input name>`` -> array whose first axis indexes samples; sample ``i`` is
  ``arr[i:i+1]`` when the model's input has a batch axis of the same rank, or ``arr[i]``
  when the array has one more axis than the input (e.g. a scalar input ``sr`` stored as
  shape ``[N]``).
* for ragged samples (sentences of different lengths): ``<i>__<input name>`` -> the full
  value of that input for sample ``i``.

Both forms may not be mixed for one input. Optional extra keys (e.g. ``labels``) are
ignored by the samplers and returned separately by :func:`load_npz`.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import DataError
from .params import Param

_RAGGED = re.compile(r"^(\d+)__(.+)$")


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (``int`` or ``str`` for symbolic/unknown dims)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializer-backed inputs of IR<4 models excluded)."""
    specs = []
    for v in model.graph.inputs:
        if v.const_value is not None or v.name in model.graph.initializers:
            continue
        dtype = np.dtype(v.dtype.numpy()) if v.dtype is not None else np.dtype(np.float32)
        shape = None
        if v.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if hasattr(d, "value") else None) for d in v.shape)
        specs.append(InputSpec(v.name, dtype, shape))
    return specs


def load_npz(path: str | Path, specs: list[InputSpec], *, what: str = "calibration") -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Read samples from an ``.npz`` file and check them against the model's inputs.

    Returns:
        ``(samples, extras)``: a list of feed dicts (one per sample, each array with the
        model input's rank) and the arrays whose keys are not model inputs (e.g. ``labels``).

    Raises:
        DataError: file missing or unreadable, an input missing, unknown-only keys, zero
            samples, sample counts that disagree, wrong rank/static dims, a dtype that cannot
            be cast safely, or NaN/Inf values.
    """
    names = {s.name for s in specs}
    # only the arrays used are decompressed (model inputs, their ragged samples, labels)
    p, arrays = _read_npz(path, what, lambda k: k in names or k in EXTRA_KEYS
                          or ((m := _RAGGED.match(k)) is not None and m.group(2) in names))
    return samples_from_arrays(arrays, specs, source=str(p), what=what)


def _read_npz(path: str | Path, what: str, used) -> tuple[Path, dict[str, np.ndarray | None]]:
    """Open an ``.npz`` file as untrusted input: a regular readable file (:func:`check_input_file`),
    a zip archive, no pickles; only the keys ``used(key)`` accepts are decompressed, and only
    when their declared sizes fit :func:`max_data_bytes` (an ignored key or a zip bomb costs
    nothing). Returns ``(path, {key: array, or None for a key not used})``.

    Raises:
        DataError: any of those fails.
    """
    from .paths import PathError, check_input_file

    try:
        p = check_input_file(path, f"{what} data")
    except PathError as exc:
        raise DataError(str(exc)) from None
    import zipfile

    if not zipfile.is_zipfile(p):
        raise DataError(f"{what} data {p}: not an .npz archive (numpy.savez writes one; see README for the format)")
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = [k for k in z.files if used(k)]
            declared = sum(z.zip.getinfo(k + ".npy").file_size for k in keys)
            limit = max_data_bytes()
            if declared > limit:
                raise DataError(f"{what} data {p}: its arrays declare {declared / 2**30:.1f} GiB, more than "
                                f"{limit / 2**30:.1f} GiB (half this machine's memory); give fewer samples")
            return p, {k: (z[k] if k in keys else None) for k in z.files}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{what} data {p}: not a readable .npz file ({exc})") from None


#: keys read besides the model's inputs
EXTRA_KEYS = ("labels",)


def read_npz_arrays(path: str | Path, *, what: str = "sample") -> dict[str, np.ndarray]:
    """Every numeric array of an ``.npz`` file but ``labels``, by key in file order, opened as
    :func:`load_npz` opens one (:func:`_read_npz`), each array numeric and finite with a leading
    batch axis.

    Raises:
        DataError: any of those fails.
    """
    p, read = _read_npz(path, what, lambda k: k not in EXTRA_KEYS)
    arrays = {k: a for k, a in read.items() if a is not None}
    for k, a in arrays.items():
        if a.dtype.kind not in "biuf" or a.ndim < 1 or a.shape[0] < 1:
            raise DataError(f"{what} data {p}: {k!r} is {a.dtype} {list(a.shape)}; give numeric arrays with a "
                            "leading batch axis")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise DataError(f"{what} data {p}: {k!r} holds NaN or Inf")
    if not arrays:
        raise DataError(f"{what} data {p}: no arrays")
    return arrays


def class_indices(labels, where: str) -> np.ndarray:
    """``labels`` as a 1-D array of integer class indices.

    Raises:
        DataError: ``"{where}: 'labels' must be a 1-D array of integer class indices, got ..."``.
    """
    a = np.asarray(labels)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise DataError(f"{where}: 'labels' must be a 1-D array of integer class indices, got {a.dtype} "
                        f"{list(a.shape)}")
    return a


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` (uncompressed) for any key: a key named ``file``, an input name, collides with
    ``np.savez``'s own argument. Readable by ``np.load`` and :func:`read_npz_arrays`."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
        for k, a in arrays.items():
            with z.open(k + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def max_data_bytes() -> int:
    """The most bytes of arrays one data file may declare: half the physical memory (16 GiB
    when it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def samples_from_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec], *, source: str = "data", what: str = "calibration"):
    """Like :func:`load_npz` for arrays already in memory."""
    names = {s.name for s in specs}
    stacked: dict[str, np.ndarray] = {}
    ragged: dict[str, dict[int, np.ndarray]] = {}
    extras: dict[str, np.ndarray] = {}
    for key, arr in arrays.items():
        m = _RAGGED.match(key)
        if m and m.group(2) in names:
            ragged.setdefault(m.group(2), {})[int(m.group(1))] = arr
        elif key in names:
            stacked[key] = arr
        else:
            extras[key] = arr
    missing = [s.name for s in specs if s.name not in stacked and s.name not in ragged]
    if missing:
        raise DataError(
            f"{what} data {source}: no array for model input(s) {missing}; "
            f"found keys {sorted(arrays)[:10]}; expected {sorted(names)}"
        )
    per_input: dict[str, list[np.ndarray]] = {}
    for s in specs:
        if s.name in stacked and s.name in ragged:
            raise DataError(f"{what} data {source}: input '{s.name}' given both stacked and as '<i>__{s.name}' keys")
        if s.name in ragged:
            idx = sorted(ragged[s.name])
            if idx != list(range(len(idx))):
                raise DataError(f"{what} data {source}: '<i>__{s.name}' keys must be numbered 0..{len(idx) - 1}")
            per_input[s.name] = [ragged[s.name][i] for i in idx]
        else:
            per_input[s.name] = _split_stacked(stacked[s.name], s, source, what)
    counts = {k: len(v) for k, v in per_input.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{what} data {source}: inputs have different sample counts {counts}")
    n_samples = next(iter(counts.values()))
    if n_samples == 0:
        raise DataError(f"{what} data {source}: zero samples")
    samples: list[dict[str, np.ndarray]] = [dict() for _ in range(n_samples)]
    for s in specs:
        for i, v in enumerate(per_input[s.name]):
            samples[i][s.name] = _check_value(v, s, source, what, i)
    return samples, extras


def _split_stacked(arr: np.ndarray, s: InputSpec, source: str, what: str) -> list[np.ndarray]:
    """Cut a stacked array into samples along its first axis.

    Same rank as the input: rows are samples; when the input's first dimension is a fixed
    ``D > 1`` each sample is ``D`` consecutive rows. One more axis than the input: axis 0
    indexes samples. A rank-0 array for a rank-0 input is one sample.
    """
    rank = len(s.shape) if s.shape is not None else arr.ndim
    if arr.ndim == rank + 1:
        return [arr[i] for i in range(arr.shape[0])]
    if arr.ndim == rank == 0:
        return [arr]
    if arr.ndim == rank:
        d0 = s.shape[0] if s.shape else None
        step = d0 if isinstance(d0, int) and d0 > 1 else 1
        if arr.shape[0] % step:
            raise DataError(f"{what} data {source}: input '{s.name}' has a fixed first dimension {step}, "
                            f"but the array's first axis ({arr.shape[0]}) is not a multiple of it")
        return [arr[i:i + step] for i in range(0, arr.shape[0], step)]
    raise DataError(
        f"{what} data {source}: input '{s.name}' expects rank {rank} "
        f"(shape {list(s.shape)}), got an array of shape {list(arr.shape)}"
    )


def _check_value(v: np.ndarray, s: InputSpec, source: str, what: str, i: int) -> np.ndarray:
    v = np.asarray(v)
    if s.shape is not None:
        if v.ndim != len(s.shape):
            raise DataError(f"{what} data {source}: sample {i} of '{s.name}' has shape {list(v.shape)}, "
                            f"the model expects rank {len(s.shape)} ({list(s.shape)})")
        for d_have, d_want in zip(v.shape, s.shape):
            if isinstance(d_want, int) and d_want > 0 and d_have != d_want:
                raise DataError(f"{what} data {source}: sample {i} of '{s.name}' has shape {list(v.shape)}, "
                                f"the model expects {list(s.shape)}")
    if v.dtype != s.dtype:
        if not (np.can_cast(v.dtype, s.dtype, casting="same_kind") or
                (v.dtype.kind in "iu" and s.dtype.kind in "iu")):
            raise DataError(f"{what} data {source}: '{s.name}' has dtype {v.dtype}, the model expects {s.dtype}")
        v = v.astype(s.dtype)
    if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
        raise DataError(f"{what} data {source}: sample {i} of '{s.name}' contains NaN or Inf")
    return v


def random_samples(specs: list[InputSpec], n: int = 8, *, seed: int = 0, shapes: dict[str, tuple[int, ...]] | None = None) -> list[dict[str, np.ndarray]]:
    """Synthesize ``n`` samples from the input spec (symbolic dims -> 1, or ``shapes``).

    Emits a ``UserWarning``: ranges calibrated on random data rarely match real inputs.
    """
    warnings.warn("no data given: using RANDOM inputs; int8 ranges and fidelity figures "
                  "from random data do not reflect real inputs", UserWarning, stacklevel=2)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        feed = {}
        for s in specs:
            # symbolic dims -> 1; a declared 0-sized dim stays 0 (an empty tensor is what the model expects)
            shape = (shapes or {}).get(s.name) or tuple(d if isinstance(d, int) and d >= 0 else 1 for d in (s.shape or ()))
            if s.dtype.kind == "f":
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            else:  # ints and bools: 0/1 are valid ids, masks and flags
                feed[s.name] = rng.integers(0, 2, shape).astype(s.dtype)
        out.append(feed)
    return out


def split_holdout(samples: list[dict[str, np.ndarray]], fraction: float = 0.25, *, min_holdout: int = 1) -> tuple[list, list]:
    """Split samples into (calibration, held-out validation) deterministically.

    Every k-th sample goes to validation, so both halves cover the whole file. With a
    single sample both lists contain it (there is nothing to hold out; the report says so).
    """
    n = len(samples)
    if n < 2:
        return samples, samples
    k = max(2, int(round(1 / fraction)))
    val_idx = set(range(k - 1, n, k)) or {n - 1}
    if len(val_idx) < min_holdout:
        val_idx = {n - 1}
    calib = [s for i, s in enumerate(samples) if i not in val_idx]
    val = [s for i, s in enumerate(samples) if i in val_idx]
    return calib, val


def _numbers(n: int, positive: bool = False):
    def check(v) -> str | None:
        if (not isinstance(v, (list, tuple)) or len(v) != n
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            return f"takes {n} numbers"
        if positive and min(v) <= 0:
            return "takes positive numbers"
        return None
    return check


IMAGE_SIZE = Param("size", None, "Image folders: HxW after resize + centre crop (off: the model's input).",
                   kind="any", optional=True, flag="--image-size", validator=_numbers(2, positive=True))
IMAGE_MEAN = Param("mean", (0.0, 0.0, 0.0), "Image folders: per-channel mean on 0-255 pixels.", kind="any",
                   flag="--mean", validator=_numbers(3))
IMAGE_STD = Param("std", (255.0, 255.0, 255.0), "Image folders: per-channel std on 0-255 pixels.", kind="any",
                  flag="--std", validator=_numbers(3, positive=True))
IMAGE_LAYOUT = Param("layout", "NCHW", "Image folders: NCHW or NHWC.", kind="str", choices=("NCHW", "NHWC"),
                     flag="--layout")
IMAGE_CHANNELS = Param("channels", "RGB", "Image folders: RGB or BGR.", kind="str", choices=("RGB", "BGR"),
                       flag="--channels")


@dataclass(frozen=True)
class ImageSpec:
    """How to turn image files into a model input.

    Attributes:
        size: (height, width) in pixels after resizing (shorter side resized, then centre crop);
            ``None`` takes it from the model's static input shape.
        mean / std: per-channel, on 0-255 pixel values: ``x = (pixel - mean) / std``.
        layout: ``NCHW`` or ``NHWC``.
        channels: ``RGB`` or ``BGR``.
    """

    size: tuple[int, int] | None = IMAGE_SIZE.field()
    mean: tuple[float, float, float] = IMAGE_MEAN.field()
    std: tuple[float, float, float] = IMAGE_STD.field()
    layout: str = IMAGE_LAYOUT.field()
    channels: str = IMAGE_CHANNELS.field()


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def load_image_folder(folder: str | Path, specs: list[InputSpec], image: ImageSpec, *, what: str = "calibration") -> list[dict[str, np.ndarray]]:
    """One sample per image file in ``folder`` (sorted by name) for a single-input model.

    Raises:
        DataError: the model has several inputs, Pillow is missing, no image is found, the
            size is unknown, or a file cannot be decoded (its name is given).
    """
    folder = Path(folder)
    if len(specs) != 1:
        raise DataError(f"{what} images: the model has {len(specs)} inputs; an image folder can feed only one (use an .npz)")
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading an image folder needs Pillow: pip install pillow") from None
    spec = specs[0]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{what} images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    size = image.size
    if size is None and spec.shape is not None and len(spec.shape) == 4:
        h, w = (spec.shape[2], spec.shape[3]) if image.layout == "NCHW" else (spec.shape[1], spec.shape[2])
        if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
            size = (h, w)
    if size is None:
        raise DataError(f"{what} images: the model input '{spec.name}' has no static height/width; give --image-size HxW")
    mean = np.asarray(image.mean, np.float32)
    std = np.asarray(image.std, np.float32)
    samples = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                h, w = size
                scale = max(h / im.height, w / im.width)
                im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                arr = np.asarray(im.crop((left, top, left + w, top + h)), np.float32)
        except Exception as exc:
            raise DataError(f"{what} images: cannot read {f.name} ({exc})") from None
        if image.channels.upper() == "BGR":
            arr = arr[..., ::-1]
        arr = (arr - mean) / std
        if image.layout.upper() == "NCHW":
            arr = arr.transpose(2, 0, 1)
        samples.append({spec.name: _check_value(arr[None].astype(np.float32), spec, str(folder), what, len(samples))})
    return samples


def shared_samples(calib_src, val_src, calib: list[dict], val: list[dict]) -> int:
    """How many samples of ``val`` are also samples of ``calib``: all of them when both name the
    same file or folder; otherwise those equal to one (a copy under another name, a subset, a
    reordering). Samples are first told apart by a key of their input names, dtypes, shapes and
    512 values spread over each array (padded images share their first bytes); only samples that
    share a key are compared in full.
    """
    import os

    if isinstance(calib_src, (str, Path)) and isinstance(val_src, (str, Path)):
        try:
            if os.path.samefile(calib_src, val_src):
                return len(val)
        except OSError:
            pass

    def key(sample: dict) -> tuple:
        parts = []
        for k in sorted(sample):
            a = np.asarray(sample[k])
            flat = a.reshape(-1)
            picked = flat[:: max(1, flat.size // 512)][:513]
            parts.append((k, a.dtype.str, a.shape,
                          picked.tobytes() if a.dtype.kind != "O" else repr(picked.tolist())))
        return tuple(parts)

    def equal(a: dict, b: dict) -> bool:
        return all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)

    by_key: dict[tuple, list[dict]] = {}
    for x in calib:
        by_key.setdefault(key(x), []).append(x)
    return sum(any(equal(v, c) for c in by_key.get(key(v), ())) for v in val)
