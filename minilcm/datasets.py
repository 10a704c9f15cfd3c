"""CIFAR-10 from online or offline sources, by one rule (``cifar_source``). The 2-D toys are ``minilcm.toys``."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, one_line

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ARCHIVE_NAME = "cifar10-jpeg.tar.gz"  # the offline JPEG archive (ImageFolder layout: train/<class>/*.jpg, test/...)


def _checkout() -> Path | None:
    """The checkout the package runs from (the folder above ``minilcm/``, when it holds pyproject.toml), else None."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "pyproject.toml").exists() else None


def _default_root() -> Path:
    """Where the official torchvision release lives: <checkout>/data/cifar10, else data/cifar10 of the cwd."""
    repo = _checkout()
    return repo / "data" / "cifar10" if repo is not None else Path("data/cifar10")


DEFAULT_ROOT = _default_root()


class CifarUnavailable(UserError, RuntimeError):
    """CIFAR-10 could not be found or read. The message (at most 3 lines) names the fix."""


def _archive_places() -> list[Path]:
    """The offline archive's usual places, in the order they are looked at: beside the checkout, then inside it."""
    repo = _checkout()
    if repo is None:
        return []
    return [repo.parent / "shared" / "data" / ARCHIVE_NAME, repo / "data" / ARCHIVE_NAME]


def _is_official(p: Path) -> bool:
    """True when ``p`` holds the official release as torchvision lays it out (p/cifar-10-batches-py/)."""
    return (p / "cifar-10-batches-py").is_dir()


def cifar_source(source: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> Path | None:
    """Where CIFAR-10 is read from: the first of

      1. ``source`` (a .tar.gz archive, an extracted ImageFolder, or a folder holding the official release);
      2. ``$MINILCM_CIFAR`` (the same kinds);
      3. ``<checkout>/../shared/data/cifar10-jpeg.tar.gz``, the offline archive beside the checkout;
      4. ``<checkout>/data/cifar10-jpeg.tar.gz``;
      5. ``root`` (default ``<checkout>/data/cifar10``) when it holds the official torchvision release.

    1 and 2 are returned as given, even when they do not exist (``cifar10`` then says so); 3-5 only when they exist.
    None: nothing was found (``cifar10`` then downloads the official release into ``root`` if allowed).
    This is the only rule: ``make``, the CLI and the notebooks all go through it.
    """
    given = source or os.environ.get("MINILCM_CIFAR") or None
    if given is not None:
        return Path(given).expanduser()
    if root is not None and _is_official(Path(root).expanduser()):  # a root the caller named comes first
        return Path(root).expanduser()
    return _found(Path(root).expanduser() if root is not None else _default_root())


def _found(root: Path) -> Path | None:
    """Steps 3-5 of :func:`cifar_source`: the first usual place that holds CIFAR-10, else None."""
    for p in _archive_places():
        if p.is_file():
            return p
    return root if _is_official(root) else None


def _fix(first: str = "") -> str:
    """The fix line: set MINILCM_CIFAR, or put the archive where the package looks by itself."""
    places = _archive_places()
    where = f", or put the archive at {places[-1]}" if places else ""
    return f"fix: {first}set MINILCM_CIFAR=/path/to/{ARCHIVE_NAME} (or its extracted folder){where}"


@dataclass
class ImageSet:
    """Images kept as uint8 (N, 3, 32, 32) in memory; indexing returns floats in [-1, 1]."""

    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) long
    classes: tuple = CIFAR10_CLASSES

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, idx):
        return to_float(self.images[idx]), self.labels[idx]

    def subset(self, n: int, seed: int = 0) -> "ImageSet":
        """n images drawn without replacement (seeded). The JPEG archive is sorted by class: the first n images are
        one or two classes, never a sample of the data set."""
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageSet(self.images[idx], self.labels[idx], self.classes)

    def __call__(self, n: int, generator=None):
        """Batch source for ``minilcm.train``: n random images (with replacement) and their labels."""
        idx = torch.randint(0, len(self), (n,), generator=generator)
        return self[idx]


def to_float(u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return u8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clipped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _read_imagefolder_items(items, classes):
    """items: iterable of (relative path parts, bytes-getter). Returns {split: (images, labels)}."""
    from PIL import Image

    out = {"train": ([], []), "test": ([], [])}
    for parts, get in items:
        if len(parts) < 3 or parts[-3] not in out or parts[-2] not in classes:
            continue
        img = np.asarray(Image.open(io.BytesIO(get())).convert("RGB"))
        out[parts[-3]][0].append(img)
        out[parts[-3]][1].append(classes.index(parts[-2]))
    return out


def _load_imagefolder(src: Path):
    classes = list(CIFAR10_CLASSES)
    try:
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            items = ((p.relative_to(src).parts, p.read_bytes) for p in files)
            out = _read_imagefolder_items(items, classes)
        else:
            with tarfile.open(src, "r:*") as tf:
                def items():
                    for m in tf:
                        if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                            f = tf.extractfile(m)
                            yield Path(m.name).parts, f.read
                out = _read_imagefolder_items(items(), classes)
        res = {}
        for split, (imgs, labels) in out.items():
            if not imgs:
                raise CifarUnavailable(f"{src} holds no {split}/<class>/*.jpg images (CIFAR-10 in ImageFolder layout: "
                                       f"train/<class>/*.jpg, test/<class>/*.jpg)\n{_fix()}")
            res[split] = (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(labels, dtype=torch.long))
        return res
    except CifarUnavailable:
        raise
    except Exception as e:  # tarfile.TarError, EOFError, zlib.error, OSError, PIL.UnidentifiedImageError, ...
        what = "the folder {} could not be read" if src.is_dir() else "the archive {} is corrupt or truncated"
        raise CifarUnavailable(f"{what.format(src)} ({one_line(e, 120, with_type=True)})\n{_fix('copy or download it again, then ')}") from e


def _cache_dir() -> Path:
    """$MINILCM_CACHE, else data/cache of the checkout the package runs from, else ~/.cache/minilcm."""
    if os.environ.get("MINILCM_CACHE"):
        return Path(os.environ["MINILCM_CACHE"])
    repo = _checkout()
    return repo / "data" / "cache" if repo is not None else Path.home() / ".cache" / "minilcm"


def _read_cache(path: Path):
    """(images, labels) from a cache file, or None when it is missing or unreadable (then it is rebuilt)."""
    if not path.exists():
        return None
    try:
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
        if not (images.dtype == np.uint8 and images.ndim == 4 and images.shape[1] == 3
                and labels.ndim == 1 and len(labels) == len(images) and len(images) > 0):
            raise ValueError(f"unexpected arrays {images.dtype}{images.shape}, {labels.dtype}{labels.shape}")
    except Exception as e:  # truncated zip, bad pickle, missing key, wrong shapes: decode again
        warnings.warn(f"ignoring the unreadable CIFAR-10 cache {path} ({one_line(e, 120, with_type=True)}); rebuilding it", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    return torch.from_numpy(images), torch.from_numpy(labels).long()


def _write_cache(path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write atomically (a private temporary file, then a rename): a reader never sees half a file, and a failed
    or interrupted write leaves no temporary behind. A cache that cannot be written is only a warning."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{path.stem}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images.numpy(), labels=labels.numpy())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not write the CIFAR-10 cache {path} ({one_line(e, 120, with_type=True)}); "
                      "set MINILCM_CACHE to a writable folder", stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _official(split: str, root: Path, download: bool, found: bool) -> ImageSet:
    """The official release through torchvision (downloaded into ``root`` when ``download``)."""
    try:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(root), train=(split == "train"), download=download)
    except Exception as e:  # offline, not downloaded and download=False, or a damaged copy
        if found:
            why = f"the official CIFAR-10 release in {root} is damaged ({one_line(e, 120, with_type=True)})"
        else:
            looked = " or ".join(str(p) for p in _archive_places())
            how = f"download failed: {one_line(e, 120, with_type=True)}" if download else "download=False"
            why = ("CIFAR-10 not found: MINILCM_CIFAR is unset, " + (f"no archive at {looked}, " if looked else "")
                   + f"no official release in {root} ({how})")
        raise CifarUnavailable(f"{why}\n{_fix()}, or run once online (torchvision downloads it into {root})") from e
    return ImageSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))


def _wrong_path(src: Path, from_argument: bool, root: Path) -> CifarUnavailable:
    """A named source that does not exist; the fix says what the rule would use without it."""
    if from_argument:
        other, what, fix = cifar_source(None, root), "given as source=", "pass source= an existing"
        other = other if other is not None and other.exists() else None
    else:
        other, what, fix = _found(root), "named by MINILCM_CIFAR", "point MINILCM_CIFAR at an existing"
    places = _archive_places()
    if other is not None:
        alt = f", or {'omit it' if from_argument else 'unset it'} to use {other}"
    elif from_argument:
        alt = f", or omit it and set MINILCM_CIFAR=/path/to/{ARCHIVE_NAME}"
    else:
        alt = f", or unset it and put the archive at {places[-1]}" if places else ""
    return CifarUnavailable(f"the CIFAR-10 source {src} ({what}) does not exist\n"
                            f"fix: {fix} {ARCHIVE_NAME} (or its extracted folder){alt}")


def cifar10(split: str = "train", source: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
            download: bool = True, cache: bool = True) -> ImageSet:
    """CIFAR-10 as an :class:`ImageSet` (uint8 in memory, [-1, 1] floats when indexed).

    The source is :func:`cifar_source`'s: ``source``, else ``$MINILCM_CIFAR``, else the offline archive at
    ``<checkout>/../shared/data/`` or ``<checkout>/data/``, else the official torchvision release in ``root``
    (default ``<checkout>/data/cifar10``; downloaded there if nothing else is found, ``download`` and online).
    The decoded arrays of an archive are cached under ``$MINILCM_CACHE`` (default data/cache), so the 60,000 JPEGs
    are decoded once; an unreadable cache file is ignored and rebuilt. Every failure is a
    :class:`CifarUnavailable` whose message (at most 3 lines) names the fix.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root).expanduser() if root is not None else _default_root()
    src = cifar_source(source, root)
    if src is None:
        return _official(split, root, download, found=False)
    if not src.exists():
        raise _wrong_path(src, bool(source), root)
    if src.is_dir() and _is_official(src):
        return _official(split, src, download, found=True)
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cached = _cache_dir() / f"cifar10-{key}-{split}.npz"
    if cache and (hit := _read_cache(cached)) is not None:
        return ImageSet(*hit)
    data = _load_imagefolder(src)
    if cache:
        for sp, (im, lb) in data.items():
            _write_cache(cached.with_name(f"cifar10-{key}-{sp}.npz"), im, lb)
    return ImageSet(*data[split])
