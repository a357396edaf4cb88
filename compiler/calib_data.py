"""Calibration data: .npy, .npz, a folder of images, or synthetic inputs, checked against the model's inputs.

Every check a user's data can fail raises CalibrationDataError naming the file and the input. Data is
streamed: .npy files are memory-mapped, images are decoded one batch at a time.
"""

from __future__ import annotations

import copy
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from compiler.errors import CalibrationDataError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
SYNTHETIC_SAMPLES = 32


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, shape (ints for static dims, None/str for symbolic ones) and numpy dtype."""

    name: str
    shape: tuple
    dtype: np.dtype


@dataclass(frozen=True)
class ImagePreprocess:
    """How to turn image files into a model input; (x - mean) / std applies to 0..255 pixel values."""

    size: tuple[int, int] | None = None
    resize: str = "crop"
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str | None = None
    channel_order: str = "RGB"


def parse_preprocess(size: str | None, mean: str | None, std: str | None, layout: str | None,
                     order: str | None, resize: str | None) -> ImagePreprocess:
    """An ImagePreprocess from CLI text (size "224" or "48x192", mean "127,127,127" or "127", ...)."""
    def floats(text, option):
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{option} {text!r}: expected numbers separated by commas") from None
        if option == "--calib-std" and any(v == 0 for v in values):
            raise UsageError(f"{option} {text!r}: std must not be 0")
        return values

    dims = None
    if size is not None:
        try:
            parts = [int(v) for v in size.lower().split("x")]
        except ValueError:
            raise UsageError(f"--calib-size {size!r}: expected N or HxW") from None
        if len(parts) not in (1, 2) or min(parts) < 1:
            raise UsageError(f"--calib-size {size!r}: expected N or HxW")
        dims = (parts[0], parts[-1])
    if layout is not None and layout.upper() not in ("NCHW", "NHWC"):
        raise UsageError(f"--calib-layout {layout!r}: must be NCHW or NHWC")
    if order is not None and order.upper() not in ("RGB", "BGR", "GRAY"):
        raise UsageError(f"--calib-order {order!r}: must be RGB, BGR or GRAY")
    if resize is not None and resize not in ("crop", "stretch", "pad"):
        raise UsageError(f"--calib-resize {resize!r}: must be crop, stretch or pad")
    return ImagePreprocess(size=dims, resize=resize or "crop",
                           mean=floats(mean, "--calib-mean") if mean else (0.0,),
                           std=floats(std, "--calib-std") if std else (1.0,),
                           layout=layout.upper() if layout else None, channel_order=(order or "RGB").upper())


class CalibrationSet:
    """A sized, re-iterable source of calibration samples; `batches()` yields feeds for the model."""

    def __init__(self, specs: list[InputSpec], num_samples: int, source: str, synthetic: bool,
                 fetch: Callable[[int, int], dict[str, np.ndarray]], origin: str):
        self.specs, self.num_samples, self.source, self.synthetic = specs, num_samples, source, synthetic
        self._fetch, self._origin = fetch, origin
        self.one_per_batch = False  # each sample is a whole feed (data of rank model rank + 1)

    def at_batch_one(self) -> "CalibrationSet":
        """The same samples, fed one at a time: what a copy of the model with its batch fixed at 1 takes."""
        view = copy.copy(self)
        view.specs = [InputSpec(s.name, (1, *s.shape[1:]), s.dtype) if s.shape else s for s in self.specs]
        return view

    def _batch_size(self, wanted: int) -> int:
        if self.one_per_batch:
            return 1
        fixed = [s.shape[0] for s in self.specs if s.shape and isinstance(s.shape[0], int)]
        return min(fixed) if fixed else wanted

    def batches(self, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` samples (the model's batch size when it is fixed)."""
        size = max(1, self._batch_size(batch_size))
        for start in range(0, self.num_samples, size):
            yield self._checked(self._fetch(start, min(start + size, self.num_samples)), start)

    def first(self, n: int) -> dict[str, np.ndarray]:
        """The first `n` samples as one feed (fewer when the model's batch is fixed)."""
        n = min(n, self.num_samples, self._batch_size(n))
        return self._checked(self._fetch(0, n), 0)

    def summary(self) -> dict:
        """Source, sample count and per-input min/max/mean, computed streaming over every sample."""
        stats: dict[str, dict] = {}
        for batch in self.batches(64):
            for name, arr in batch.items():
                a = arr.astype(np.float64)
                s = stats.setdefault(name, {"shape": list(arr.shape[1:]), "dtype": arr.dtype.name, "min": np.inf,
                                            "max": -np.inf, "sum": 0.0, "n": 0})
                s["min"], s["max"] = min(s["min"], float(a.min(initial=np.inf))), max(s["max"], float(a.max(initial=-np.inf)))
                s["sum"] += float(a.sum())
                s["n"] += a.size
        inputs = {k: {"shape": v["shape"], "dtype": v["dtype"], "min": v["min"], "max": v["max"],
                      "mean": v["sum"] / max(v["n"], 1)} for k, v in stats.items()}
        return {"source": self.source, "num_samples": self.num_samples, "synthetic": self.synthetic, "inputs": inputs}

    def _checked(self, feed: dict[str, np.ndarray], start: int) -> dict[str, np.ndarray]:
        for name, arr in feed.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = int(np.argwhere(~np.isfinite(arr.reshape(len(arr), -1) if arr.ndim else arr.reshape(1, -1)))[0][0])
                raise CalibrationDataError(f"{self._origin}: input '{name}' has NaN or Inf in sample {start + bad}")
        return feed


def load_calibration(path: str | Path | None, inputs: list[InputSpec], *, max_samples: int | None = None,
                     preprocess: ImagePreprocess | None = None, seed: int = 0) -> CalibrationSet:
    """Open calibration data for a model with `inputs`; None gives deterministic synthetic data."""
    if path is None:
        return _synthetic(inputs, seed)
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"{path}: no such calibration file or folder")
    if path.is_dir():
        data = _images(path, inputs, preprocess or ImagePreprocess())
    elif path.suffix == ".npy":
        data = _npy(path, inputs)
    elif path.suffix == ".npz":
        data = _npz(path, inputs)
    else:
        raise CalibrationDataError(f"{path}: unknown calibration format (use .npy, .npz or a folder of images)")
    if data.num_samples == 0:
        raise CalibrationDataError(f"{path}: holds no samples")
    if max_samples is not None:
        data.num_samples = min(data.num_samples, max_samples)
        data.source = f"{path.name} ({data.num_samples} samples)"
    if path.suffix in (".npy", ".npz"):
        for _ in data.batches(16):  # surface NaN/Inf before any compile work
            pass
    return data


# ----------------------------------------------------------------------------- formats
def _synthetic(inputs: list[InputSpec], seed: int) -> CalibrationSet:
    """SYNTHETIC_SAMPLES deterministic samples, generated batch by batch (never all at once)."""
    shapes = {spec.name: _synthetic_shape(spec) for spec in inputs}

    def sample(spec: InputSpec, index: int) -> np.ndarray:
        rng = np.random.default_rng([seed, index])
        shape = shapes[spec.name]
        if spec.dtype.kind == "f":
            return np.clip(rng.standard_normal(shape), -3, 3).astype(spec.dtype)
        if spec.dtype.kind == "b":
            return np.zeros(shape, dtype=spec.dtype)
        if not spec.shape:
            return np.array(16000 if "sr" in spec.name else 0, dtype=spec.dtype)
        return rng.integers(0, 256, size=shape).astype(spec.dtype)

    whole = {spec.name: bool(spec.shape) and isinstance(spec.shape[0], int) for spec in inputs}

    def fetch(start: int, stop: int) -> dict[str, np.ndarray]:
        feed = {}
        for spec in inputs:
            if not spec.shape or whole[spec.name]:
                feed[spec.name] = sample(spec, start)
            else:
                feed[spec.name] = np.stack([sample(spec, i) for i in range(start, stop)])
        return feed

    data = CalibrationSet(list(inputs), SYNTHETIC_SAMPLES, f"synthetic inputs ({SYNTHETIC_SAMPLES} samples)", True,
                          fetch, "synthetic data")
    data.one_per_batch = any(whole.values()) or any(not spec.shape for spec in inputs)
    return data


def _synthetic_shape(spec: InputSpec) -> tuple:
    if not spec.shape:
        return ()
    dims = list(spec.shape) if isinstance(spec.shape[0], int) else list(spec.shape[1:])
    unknown = 224 if len(spec.shape) == 4 else 1  # symbolic dims of an image input (NCHW or NHWC): image-sized
    return tuple(d if isinstance(d, int) else unknown for d in dims)


def _npy(path: Path, inputs: list[InputSpec]) -> CalibrationSet:
    if len(inputs) != 1:
        raise CalibrationDataError(f"{path}: a .npy file feeds one input, but the model has {len(inputs)} "
                                   f"({', '.join(s.name for s in inputs)}); use an .npz with one array per input")
    try:
        array = NpyRows(path)
    except ValueError as exc:
        if "pickle" in str(exc).lower() or "object" in str(exc).lower():
            raise CalibrationDataError(f"{path}: needs pickle to load; refusing to unpickle user data") from None
        raise CalibrationDataError(f"{path}: not a readable .npy file ({exc})") from None
    except (OSError, EOFError) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npy file ({exc})") from None
    return _from_arrays({inputs[0].name: array}, inputs, f"{path.name}", synthetic=False, origin=str(path))


class NpyRows:
    """A .npy file read row range by row range with plain file reads: memory holds only the rows asked
    for (a memory map would keep every page it touched resident)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            self.offset = f.tell()
        if dtype.hasobject:
            raise ValueError("object arrays need pickle")
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays are not supported; save with np.save on a C-ordered array")
        self.shape, self.dtype, self.ndim = tuple(shape), dtype, len(shape)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __getitem__(self, index):
        if not self.shape:
            return self._read(0, 1).reshape(())
        if isinstance(index, slice):
            start, stop, _ = index.indices(self.shape[0])
            return self._read(start, max(start, stop))
        return self._read(index, index + 1)[0]

    def __array__(self, dtype=None, copy=None):
        return self._read(0, len(self)) if self.shape else self[()]

    def _read(self, start: int, stop: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.offset + start * self.row_bytes)
            data = np.fromfile(f, dtype=self.dtype, count=(stop - start) * self.row_bytes // self.dtype.itemsize)
        return data.reshape((stop - start,) + self.shape[1:])


def _npz(path: Path, inputs: list[InputSpec]) -> CalibrationSet:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationDataError(f"{path}: not a readable .npz file ({exc})") from None
    missing = [s.name for s in inputs if s.name not in archive.files]
    if missing:
        raise CalibrationDataError(f"{path}: no array for input '{missing[0]}' (arrays present: "
                                   f"{', '.join(archive.files) or 'none'})")
    try:
        arrays = {s.name: archive[s.name] for s in inputs}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise CalibrationDataError(f"{path}: needs pickle to load; refusing to unpickle user data") from None
        raise CalibrationDataError(f"{path}: unreadable array ({exc})") from None
    return _from_arrays(arrays, inputs, f"{path.name}", synthetic=False, origin=str(path))


def _from_arrays(arrays: dict[str, np.ndarray], inputs: list[InputSpec], source: str, synthetic: bool,
                 origin: str) -> CalibrationSet:
    counts, per_sample = {}, {}
    for spec in inputs:
        arr = arrays[spec.name]
        _check_dtype(arr, spec, origin)
        rank = len(spec.shape)
        if rank == 0:
            if arr.ndim == 0:
                continue  # a scalar broadcast to every sample
            if arr.ndim != 1:
                raise CalibrationDataError(f"{origin}: input '{spec.name}' is a scalar; expected data of shape [N], got {list(arr.shape)}")
            counts[spec.name], per_sample[spec.name] = len(arr), "scalar"
        elif arr.ndim == rank:
            _check_dims(arr.shape[1:], spec.shape[1:], spec, origin, arr.shape)
            counts[spec.name], per_sample[spec.name] = len(arr), "row"
        elif arr.ndim == rank + 1:
            _check_dims(arr.shape[1:], spec.shape, spec, origin, arr.shape)
            counts[spec.name], per_sample[spec.name] = len(arr), "whole"
        else:
            raise CalibrationDataError(f"{origin}: input '{spec.name}' expects shape {_fmt(spec.shape)} per batch, "
                                       f"got data of shape {list(arr.shape)}")
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{origin}: inputs have different sample counts "
                                   f"({', '.join(f'{k}={v}' for k, v in counts.items())})")
    n = next(iter(counts.values())) if counts else 1

    def fetch(start: int, stop: int) -> dict[str, np.ndarray]:
        feed = {}
        for spec in inputs:
            arr = arrays[spec.name]
            mode = per_sample.get(spec.name)
            if mode is None:
                value = np.asarray(arr)
            elif mode == "whole":
                value = np.asarray(arr[start])
            elif mode == "scalar":
                value = np.asarray(arr[start])
            else:
                value = np.asarray(arr[start:stop])
            feed[spec.name] = value.astype(spec.dtype, copy=False)
        return feed

    data = CalibrationSet(list(inputs), n, f"{source} ({n} samples)", synthetic, fetch, origin)
    data.one_per_batch = "whole" in per_sample.values()
    return data


def _check_dtype(arr: np.ndarray, spec: InputSpec, origin: str) -> None:
    if arr.dtype == object:
        raise CalibrationDataError(f"{origin}: input '{spec.name}' holds Python objects; refusing to unpickle user data")
    want, got = spec.dtype.kind, arr.dtype.kind
    ok = (want == got) or (want == "f" and got in "iub") or (want in "iu" and got in "iu") or (want == "b" and got == "b")
    if not ok:
        raise CalibrationDataError(f"{origin}: input '{spec.name}' is {spec.dtype.name} but the data is {arr.dtype.name}")


def _check_dims(got: tuple, want: tuple, spec: InputSpec, origin: str, full: tuple) -> None:
    if len(got) != len(want) or any(isinstance(w, int) and w != g for g, w in zip(got, want)):
        raise CalibrationDataError(f"{origin}: input '{spec.name}' expects shape {_fmt(spec.shape)}, "
                                   f"got data of shape {list(full)} (axis 0 = samples)")


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else (d or "?") for d in shape) + "]"


def _images(folder: Path, inputs: list[InputSpec], pre: ImagePreprocess) -> CalibrationSet:
    images = [s for s in inputs if len(s.shape) == 4 and s.dtype.kind == "f"]
    if len(inputs) != 1 or len(images) != 1:
        raise CalibrationDataError(f"{folder}: a folder of images feeds one 4-D float input, but the model's inputs "
                                   f"are {', '.join(f'{s.name}{_fmt(s.shape)}' for s in inputs)}")
    spec = images[0]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    layout = pre.layout or ("NHWC" if spec.shape[3] in (1, 3) and spec.shape[1] not in (1, 3) else "NCHW")
    h_axis, w_axis, c_axis = (2, 3, 1) if layout == "NCHW" else (1, 2, 3)
    size = pre.size or tuple(spec.shape[a] if isinstance(spec.shape[a], int) else 224 for a in (h_axis, w_axis))
    channels = spec.shape[c_axis] if isinstance(spec.shape[c_axis], int) else (1 if pre.channel_order == "GRAY" else 3)

    def fetch(start: int, stop: int) -> dict[str, np.ndarray]:
        batch = np.stack([_load_image(f, size, channels, pre) for f in files[start:stop]])  # N,H,W,C
        if layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return {spec.name: np.ascontiguousarray(batch, dtype=spec.dtype)}

    return CalibrationSet([spec], len(files), f"{folder.name}/ ({len(files)} images)", False, fetch, str(folder))


def _load_image(path: Path, size: tuple[int, int], channels: int, pre: ImagePreprocess) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            h, w = size
            if pre.resize == "stretch":
                im = im.resize((w, h), Image.BILINEAR)
            elif pre.resize == "pad":
                scale = min(w / im.width, h / im.height)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
                canvas = Image.new(im.mode, (w, h))
                canvas.paste(im, (0, 0))
                im = canvas
            else:
                short = max(h, w) * 8 / 7
                scale = short / min(im.width, im.height)
                im = im.resize((max(w, round(im.width * scale)), max(h, round(im.height * scale))), Image.BILINEAR)
                left, top = (im.width - w) // 2, (im.height - h) // 2
                im = im.crop((left, top, left + w, top + h))
            pixels = np.asarray(im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise CalibrationDataError(f"{path}: cannot read image ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pre.channel_order == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(pre.mean, np.float32)
    std = np.asarray(pre.std, np.float32)
    return (pixels - mean) / std
