"""Data: CelebA from whatever was downloaded, cached once as small uint8 images, and the built-in faces.

Reading. ``load_celeba(path)`` accepts a folder of aligned JPEGs (``img_align_celeba/``, or the JPEGs
directly in ``path``), the ``img_align_celeba.zip`` archive (read in place, never unzipped), or torchvision's
layout ``path/celeba/{img_align_celeba/, list_eval_partition.txt}``. With ``list_eval_partition.txt`` the
official split is used; without it the images, sorted by file name, are split 80/10/10 into train, valid
and test (the official split has the same shape: contiguous in file name, about 80/10/10).

Preprocessing, as the common CelebA-64 pipelines do it (torchvision's ``CenterCrop(148)`` then
``Resize(64)`` on PIL images, as in PyTorch-VAE): a 148x148 centre crop of the 178x218 image, then a resize
to ``image_size`` with Pillow's antialiased bilinear filter, which is what ``Resize`` calls on a PIL image.
``resample`` picks another of Pillow's filters (``RESAMPLE_FILTERS``); the cache is kept per filter.

The cache. Decoding a JPEG costs about a millisecond; an epoch over 200k images would spend minutes on it.
So every image is decoded once, in parallel, into one uint8 file of shape (N, 3, H, W) that later runs
memory-map: a second run starts in seconds and no epoch decodes a JPEG. The cache is written to a
temporary file and renamed when complete, and a JSON file beside it (written last) records a key made of
the source's file list (names, sizes, dates or CRCs), the split and the preprocessing. A cache whose key
or size does not match is rebuilt, never used. Rows are ordered by split, then file name, so each split
is a contiguous slice of the memory map.

Batches. ``Batches`` shuffles once per epoch from ``(seed, epoch)``, gathers each batch from the memory
map with one index array, and converts uint8 to floats in [0, 1] on the device. On a GPU the training split
is first copied to the device when it fits (``keep_on_device``; 2 GB for CelebA at 64x64), and each batch is
gathered there.

Messages (missing images, fallbacks, skipped files, the synthetic-data notice) go to the
``scratchvae.data`` logger at WARNING level, which Python prints on stderr even when logging is not
configured, and are also kept in ``Dataset.messages`` (and ``Dataset.notice``) for a CLI to show.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import threading
import time
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import backend
from .faces import FACTOR_NAMES, render_faces, sample_factors, synthetic_faces

__all__ = [
    "DataError", "ImageArray", "Dataset", "CelebA", "Batches", "load_celeba", "load_synthetic",
    "scan_celeba", "preprocess", "decode_image", "as_batch", "keep_on_device", "default_cache_dir", "RESAMPLE_FILTERS",
    "synthetic_faces", "render_faces", "sample_factors", "FACTOR_NAMES", "SYNTHETIC_NOTICE",
]

log = logging.getLogger(__name__)

CELEBA_SIZE = (178, 218)  # (width, height) of every aligned CelebA image
CROP = 148  # side of the centre crop the common CelebA-64 pipelines take
RESAMPLE_FILTERS = {  # --resample's names for Pillow's filters; all but nearest are antialiased when shrinking
    "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
    "hamming": Image.Resampling.HAMMING, "box": Image.Resampling.BOX, "nearest": Image.Resampling.NEAREST,
}
RESAMPLE = "bilinear"  # torchvision's Resize default, which calls Pillow's img.resize(size, BILINEAR) on PIL images
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PARTITION_FILES = ("list_eval_partition.txt", "list_eval_partition.csv")  # official / Kaggle's copy
SPLITS = ("train", "valid", "test")
HELD_OUT = 0.1  # fraction for a held-out split when none is given
CACHE_VERSION = 1  # bump when the cache format or the preprocessing changes
SYNTHETIC_NOTICE = (
    "Using the built-in SYNTHETIC faces (procedurally drawn, not real photos). For real CelebA, run with "
    "--data PATH: a folder of img_align_celeba JPEGs, img_align_celeba.zip, or torchvision's celeba/ root."
)


class DataError(ValueError):
    """Bad data input: the message names the file or folder and says what to do."""


# --------------------------------------------------------------------------------------------------
# Splits and datasets


class ImageArray:
    """One split: uint8 images ``(n, 3, H, W)`` (a read-only memory map for CelebA) with their labels.

    ``names`` are the CelebA file names (CelebA only); ``factors`` map factor name -> (n,) array
    (synthetic faces only).
    """

    def __init__(self, images, names=None, factors=None, name: str = ""):
        self.images = images
        self.names = names
        self.factors = factors
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):
        """The uint8 images at ``index`` (host arrays; ``as_batch`` turns them into device floats)."""
        return self.images[index]

    @property
    def image_size(self) -> int:
        """Side of the square images in pixels."""
        return int(self.images.shape[-1])

    def __repr__(self) -> str:
        return f"ImageArray({self.name!r}, n={len(self)}, size={self.image_size})"


class Dataset:
    """The train, valid and test splits (``ImageArray``) of one source, and what is known about it.

    ``source`` describes where the images came from; ``messages`` are the warnings loading produced;
    ``notice`` is a line a program must show its user (set for synthetic data), else None.
    """

    def __init__(self, train, valid, test, source, image_size, notice=None, messages=(), cache_path=None,
                 cache_built=False):
        self.train, self.valid, self.test = train, valid, test
        self.source = source
        self.image_size = image_size
        self.notice = notice
        self.messages = list(messages)
        self.cache_path = cache_path
        self.cache_built = cache_built

    @property
    def splits(self) -> dict:
        """The three splits by name."""
        return {"train": self.train, "valid": self.valid, "test": self.test}

    def __repr__(self) -> str:
        sizes = " / ".join(f"{k} {len(v):,}" for k, v in self.splits.items())
        return f"Dataset({self.source!r}; {sizes})"


CelebA = Dataset  # the name load_celeba's callers know; load_synthetic returns the same type


# --------------------------------------------------------------------------------------------------
# Preprocessing


def crop_box(size=CELEBA_SIZE, crop: int = CROP) -> tuple:
    """The (left, top, right, bottom) box of the centre crop, rounded as torchvision's CenterCrop does."""
    w, h = size
    left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
    return left, top, left + crop, top + crop


def draft_scale(image_size: int, crop: int = CROP) -> int:
    """The largest JPEG draft reduction (1, 2, 4 or 8) that still leaves at least ``image_size`` pixels."""
    return max(s for s in (1, 2, 4, 8) if crop // s >= image_size)


def resample_filter(resample: str) -> Image.Resampling:
    """Pillow's filter for a ``RESAMPLE_FILTERS`` name; a DataError naming the choices otherwise."""
    if resample not in RESAMPLE_FILTERS:
        raise DataError(f"unknown resample filter {resample!r}; choose one of {', '.join(RESAMPLE_FILTERS)}")
    return RESAMPLE_FILTERS[resample]


def preprocess(img: Image.Image, image_size: int = 64, draft: bool = False, resample: str = RESAMPLE) -> np.ndarray:
    """Centre-crop 148x148 and resize to ``image_size`` with the ``resample`` filter (default bilinear, as
    torchvision's ``CenterCrop(148)``, ``Resize(image_size)`` do on a PIL image): uint8 ``(3, size, size)``.

    ``draft=True`` lets the JPEG decoder work at a reduced scale first. That is about twice as fast but
    not equal to a full decode: on the real CelebA sample at 64 px only ~69% of values stay within one
    grey level (mean |difference| ~1.4, some edge pixels up to ~40), so it is off by default.
    """
    size, filt = img.size, resample_filter(resample)
    if draft and img.format == "JPEG" and (scale := draft_scale(image_size)) > 1:
        img.draft("RGB", (-(-size[0] // scale), -(-size[1] // scale)))
        k = img.size[0] / size[0]
        # At reduced scale the crop box falls between pixels: resize reads the fractional region directly.
        box = tuple(c * k for c in crop_box(size))
        img = as_rgb(img)
        out = img.resize((image_size, image_size), filt, box=box)
    else:
        img = as_rgb(img)
        # Crop first, then resize: resize(box=...) would let the filter read pixels outside the crop.
        out = img.crop(crop_box(size)).resize((image_size, image_size), filt)
    return np.asarray(out, dtype=np.uint8).transpose(2, 0, 1)


def as_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB. 16-bit greyscale (a PNG mode) is scaled down to 8 bits first: Pillow's ``convert``
    would clip its levels 0..65535 at 255, turning nearly every pixel white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        levels = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((levels * 255 + 32767) // 65535).astype(np.uint8), "L")
    return img if img.mode == "RGB" else img.convert("RGB")


class SkipImage(Exception):
    """An image that cannot be used; the message says why and what to do."""


def decode_image(fp, image_size: int = 64, draft: bool = False, resample: str = RESAMPLE) -> np.ndarray:
    """Decode one aligned CelebA image (a path or a binary file) into uint8 ``(3, H, W)``.

    Raises ``SkipImage`` for a file that is not a readable image, or not 178x218.
    """
    try:
        with Image.open(fp) as img:
            if img.size != CELEBA_SIZE:
                raise SkipImage(
                    f"is {img.size[0]}x{img.size[1]} pixels, not the {CELEBA_SIZE[0]}x{CELEBA_SIZE[1]} of aligned "
                    "CelebA (img_align_celeba); remove it, or use the aligned images rather than img_celeba"
                )
            return preprocess(img, image_size, draft, resample)
    except SkipImage:
        raise
    except Exception as e:  # noqa: BLE001  (Pillow raises OSError, SyntaxError, ValueError... on bad files)
        raise SkipImage(
            f"cannot be decoded ({type(e).__name__}: {e}); it is corrupt or truncated: re-download or delete it"
        ) from None


def _check_image_size(image_size) -> int:
    """``image_size`` as an int, or a DataError when it cannot come from the 148x148 crop."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 8 <= image_size <= CROP:
        raise DataError(f"image_size must be an integer from 8 to {CROP} (usually 32, 64 or 128), got {image_size!r}")
    return int(image_size)


# --------------------------------------------------------------------------------------------------
# Finding the images and the split


@dataclass
class Listing:
    """What a CelebA source holds, before any decoding: images sorted by file name, and their split."""

    kind: str  # "folder" or "zip"
    root: Path  # the folder holding the images, or the zip file
    members: list  # file names in the folder, or member names inside the zip
    names: list  # image file names (the member's last path part), used to match the partition file
    stamps: list  # per image (size, mtime_ns) or (size, crc): what the cache key watches for changes
    labels: np.ndarray  # 0 train, 1 valid, 2 test
    split_from: str  # where the split came from, in words
    messages: list = field(default_factory=list)


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.lower().endswith(IMAGE_EXTENSIONS) and not base.startswith("._")  # ._*: macOS resource forks


def _folder_images(folder: Path) -> list:
    """The image files directly inside ``folder`` as (name, (size, mtime_ns)), unsorted."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if _is_image_name(e.name) and e.is_file():
                st = e.stat()
                out.append((e.name, (st.st_size, st.st_mtime_ns)))
    return out


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(_is_image_name(e.name) and e.is_file() for e in it)


def find_source(path) -> tuple:
    """Locate the images under ``path``: ("folder" or "zip", the folder or zip file, partition file or None)."""
    if path is None or str(path).strip() == "":
        raise DataError("no data path given; pass the CelebA location, or use load_synthetic for built-in faces")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"data path {p} does not exist. Give a folder of img_align_celeba JPEGs, img_align_celeba.zip, or the "
            "folder holding torchvision's celeba/; or leave the path out to use the built-in synthetic faces."
        )
    if p.is_file():
        if not zipfile.is_zipfile(p):
            with open(p, "rb") as f:
                zip_like = f.read(2) == b"PK" or p.suffix.lower() == ".zip"
            raise DataError(
                f"{p} is damaged or incomplete (not a readable zip archive: a download cut short?); re-download it"
                if zip_like else
                f"{p} is a file but not a zip archive; give the folder of JPEGs or img_align_celeba.zip instead"
            )
        return "zip", p, _find_partition([p.parent, p.parent / "Eval"])
    # torchvision's root/celeba/, then the path itself; unzipping into a folder of the same name
    # often leaves img_align_celeba/img_align_celeba/, so look one level further down too.
    for base in (p / "celeba", p):
        folder = base
        for _ in range(3):
            if folder.is_dir() and _has_images(folder):
                return "folder", folder, _find_partition(
                    [folder, folder.parent, base, base / "Eval", folder.parent / "Eval"]
                )
            folder = folder / "img_align_celeba"
        z = base / "img_align_celeba.zip"
        if z.is_file():
            return "zip", z, _find_partition([base, base / "Eval"])
    empty = " (the folder is empty)" if not any(p.iterdir()) else ""
    raise DataError(
        f"no CelebA images found in {p}{empty}: expected .jpg files there, or img_align_celeba/ or "
        "img_align_celeba.zip inside it, or torchvision's celeba/ folder. Download aligned CelebA "
        "(img_align_celeba.zip, 1.4 GB), or leave the path out to use the built-in synthetic faces."
    )


def _find_partition(folders) -> Path | None:
    for folder in folders:
        for name in PARTITION_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _partition_line_ok(line: str) -> bool:
    parts = line.replace(",", " ").split()
    return len(parts) == 2 and parts[1] in ("0", "1", "2")


def read_partition(text: str, origin: str) -> dict:
    """Parse ``list_eval_partition`` text (``000001.jpg 0`` lines, or Kaggle's CSV): image stem -> 0/1/2."""
    tokens = text.replace(",", " ").split()  # one pass over the whole text: ~10x faster than line by line
    header = len(tokens) >= 2 and not tokens[0].lower().endswith(IMAGE_EXTENSIONS) and not tokens[1].isdigit()
    if header:  # Kaggle's CSV starts with image_id,partition
        tokens = tokens[2:]
    names, labels = tokens[0::2], tokens[1::2]
    if len(names) != len(labels) or not set(labels) <= {"0", "1", "2"}:
        lines = [(k, line) for k, line in enumerate(text.splitlines(), 1) if line.strip()][int(header):]
        number, line = next(((k, line) for k, line in lines if not _partition_line_ok(line)), (0, text[:80]))
        raise DataError(
            f"{origin}, line {number}: expected '<image>.jpg <0|1|2>', got {line.strip()[:80]!r}; "
            "the partition file is damaged: re-download it, or delete it to split by file name"
        )
    if not names:
        raise DataError(f"{origin} lists no images; re-download it, or delete it to split by file name")
    code = {"0": 0, "1": 1, "2": 2}
    return {n[: n.rfind(".")] if "." in n else n: code[v] for n, v in zip(names, labels)}


def _held_out_labels(n: int) -> np.ndarray:
    """Labels for ``n`` name-sorted images with no partition file: first 80% train, then 10% valid, 10% test."""
    k = max(1, round(HELD_OUT * n))
    labels = np.zeros(n, np.int8)
    labels[n - 2 * k : n - k] = 1
    labels[n - k :] = 2
    return labels


def scan_celeba(path, limit: int | None = None) -> Listing:
    """List the images under ``path`` (no decoding) and assign each to train, valid or test."""
    kind, root, partition = find_source(path)
    messages = []
    zip_partition = None
    if kind == "folder":
        entries = _folder_images(root)
    else:
        try:
            with zipfile.ZipFile(root) as zf:
                infos = zf.infolist()
                for info in infos:
                    if info.filename.rsplit("/", 1)[-1] in PARTITION_FILES and partition is None:
                        zip_partition = zf.read(info).decode("utf-8", "replace")
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(f"{root} is damaged or incomplete (it cannot be read as a zip archive: {e}; a download "
                            "cut short?); re-download it") from None
        entries, seen = [], set()
        for info in sorted(infos, key=lambda i: i.filename):
            base = info.filename.rsplit("/", 1)[-1]
            if info.is_dir() or not _is_image_name(info.filename) or info.filename.startswith("__MACOSX/"):
                continue
            if base in seen:
                continue  # the same image under two folders of the archive: keep the first
            seen.add(base)
            entries.append((info.filename, (info.file_size, info.CRC)))
        if not entries:
            raise DataError(
                f"{root} holds no .jpg images ({len(infos)} other entries); it is not img_align_celeba.zip, "
                "or the download is incomplete: re-download it"
            )
    if not entries:
        raise DataError(f"{root} holds no images; it is empty or holds no .jpg files")
    entries.sort(key=lambda e: (e[0].rsplit("/", 1)[-1], e[0]))
    if limit is not None:
        if int(limit) < 1:
            raise DataError(f"limit must be a positive number of images, got {limit}")
        entries = entries[: int(limit)]
    members = [m for m, _ in entries]
    names = [m.rsplit("/", 1)[-1] for m in members]
    n = len(names)

    if partition is not None or zip_partition is not None:
        origin = str(partition) if partition is not None else f"{root}:list_eval_partition"
        text = partition.read_text("utf-8", "replace") if partition is not None else zip_partition
        table = read_partition(text, origin)
        stems = [nm.rsplit(".", 1)[0] for nm in names]
        labels = np.array([table.get(s, -1) for s in stems], np.int8)
        unlisted = int((labels < 0).sum())
        if unlisted:
            messages.append(
                f"{unlisted:,} of {n:,} images are not in {origin} (e.g. {names[int(np.argmax(labels < 0))]}); "
                "they are used for training"
            )
            labels[labels < 0] = 0
        split_from = f"official split from {Path(origin).name}"
        if limit is None:
            present = set(stems)
            missing = np.bincount([v for k, v in table.items() if k not in present], minlength=3)
            if missing.sum():
                messages.append(
                    f"{origin} names {len(table):,} images but {missing.sum():,} are not in {root} "
                    f"(train {missing[0]:,} / valid {missing[1]:,} / test {missing[2]:,} missing; a partial "
                    f"download?); using the {n - unlisted:,} present"
                )
    else:
        if n < 3:
            raise DataError(
                f"{root} holds {n} image(s); at least 3 are needed to make train, valid and test splits"
            )
        labels = _held_out_labels(n)
        split_from = "no list_eval_partition.txt: split by file name, first 80% train, next 10% valid, last 10% test"
    return Listing(kind, root, members, names, [s for _, s in entries], labels, split_from, messages)


# --------------------------------------------------------------------------------------------------
# The cache


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/scratchvae``, or ``~/.cache/scratchvae``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scratchvae"


def _writable(folder: Path) -> bool:
    """Whether we may write in ``folder``. The mode bits are checked too: root passes ``os.access``
    everywhere, but a folder with no write bits (a shared read-only data set) must be left alone."""
    try:
        st = folder.stat()
        readonly_fs = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
    return bool(st.st_mode & 0o222) and os.access(folder, os.W_OK) and not readonly_fs


def default_cache_dir(root) -> Path:
    """Where a source's cache goes by default: ``.scratchvae-cache/`` beside the images, else the user cache."""
    root = Path(root)
    data_dir = root if root.is_dir() else root.parent
    return data_dir / ".scratchvae-cache" if _writable(data_dir) else user_cache_dir()


def _cache_key(listing: Listing, order: np.ndarray, image_size: int, draft: bool, resample: str) -> str:
    """A digest of everything the cached pixels depend on: file list, file stamps, split, preprocessing."""
    h = hashlib.sha256()
    params = dict(version=CACHE_VERSION, kind=listing.kind, size=image_size, crop=CROP, celeba=CELEBA_SIZE,
                  resample=RESAMPLE_FILTERS[resample].name, draft=bool(draft), pillow=Image.__version__.split(".")[0])
    h.update(json.dumps(params, sort_keys=True).encode())
    m, st, lab = listing.members, listing.stamps, listing.labels
    h.update("".join(f"{m[i]}\t{st[i]}\t{lab[i]}\n" for i in order).encode())
    return h.hexdigest()


def _cache_paths(cache_dir: Path, listing: Listing, image_size: int, draft: bool, resample: str) -> tuple:
    # one cache per filter, so that switching --resample back and forth does not rebuild each time
    src = hashlib.sha1(str(listing.root.resolve()).encode()).hexdigest()[:10]
    stem = f"celeba-{image_size}px-{len(listing.names)}img-{src}-{resample}{'-draft' if draft else ''}"
    return cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"


def _open_cache(data_path: Path, meta_path: Path, key: str):
    """The memory-mapped images and metadata of a complete, current cache; None (and why) otherwise."""
    if not meta_path.is_file():
        return None, "no cache yet" if not data_path.exists() else "the cache has no metadata (interrupted?)"
    try:
        meta = json.loads(meta_path.read_text())
        shape = tuple(meta["shape"])
        stale = meta.get("key") != key or meta.get("version") != CACHE_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"the cache metadata {meta_path} is unreadable"
    if stale:
        return None, "the source or the preprocessing changed since the cache was built"
    if not data_path.is_file() or data_path.stat().st_size != math.prod(shape):
        return None, f"{data_path} is missing or not the size its metadata records (interrupted or damaged)"
    return (np.memmap(data_path, np.uint8, "r", shape=shape) if shape[0] else np.zeros(shape, np.uint8), meta), ""


_WORKER = {}  # per process: the decoder's source and the memory map being filled


def _init_worker(kind: str, root: str, tmp: str, shape: tuple, image_size: int, draft: bool, resample: str,
                 pool: bool = False) -> None:
    if pool:  # a pool's worker process, not the main process decoding alone (workers=1)
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _WORKER.update(kind=kind, root=root, size=image_size, draft=draft, resample=resample,
                   zip=zipfile.ZipFile(root) if kind == "zip" else None,
                   mm=np.memmap(tmp, np.uint8, "r+", shape=shape))


def _exit_with_parent(parent: int, every: float = 0.2) -> None:
    """End this worker process once its parent has gone (killed with SIGKILL, say): a worker waiting for its next
    chunk would otherwise wait forever, holding the deleted temporary cache open. An orphan is adopted by another
    process, so ``getppid`` then changes."""
    while os.getppid() == parent:
        time.sleep(every)
    os._exit(1)


def _decode_rows(start: int, members: list) -> list:
    """Decode ``members`` into rows ``start...`` of the cache; return the skipped ones as (row, member, why)."""
    w, bad = _WORKER, []
    for row, member in enumerate(members, start):
        try:
            fp = io.BytesIO(w["zip"].read(member)) if w["zip"] is not None else os.path.join(w["root"], member)
            w["mm"][row] = decode_image(fp, w["size"], w["draft"], w["resample"])
        except SkipImage as e:
            bad.append((row, member, str(e)))
        except Exception as e:  # noqa: BLE001  (a damaged zip entry: skip it, as a corrupt file)
            bad.append((row, member, f"cannot be read ({type(e).__name__}: {e}); re-download the archive"))
    return bad


def _remove_stale_temporaries(data_path: Path) -> None:
    """Delete temporary cache files left by builds that died (their process id no longer runs)."""
    for tmp in data_path.parent.glob(data_path.name + ".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # raises if no such process: the build that wrote it is gone
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def _auto_workers(n: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, -(-n // 256)))  # starting a process costs more than decoding ~256 images


def _build_cache(listing, order, image_size, draft, resample, data_path, meta_path, key, workers, progress) -> dict:
    """Decode every image once into ``data_path`` (atomically) and write ``meta_path`` last; return the metadata."""
    from tqdm.auto import tqdm  # noqa: PLC0415  (only a build needs it)

    n, row = len(order), 3 * image_size * image_size
    cache_dir = data_path.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache folder {cache_dir} ({e}); pass another cache_dir") from None
    free = shutil.disk_usage(cache_dir).free
    if free < n * row + (64 << 20):
        raise DataError(
            f"the cache needs {n * row / 1e9:.2f} GB but {cache_dir} has {free / 1e9:.2f} GB free; "
            "pass a cache_dir on a disk with room (or a smaller image_size or limit)"
        )
    meta_path.unlink(missing_ok=True)  # from here until the new metadata is written, no cache is valid
    _remove_stale_temporaries(data_path)
    tmp = data_path.with_name(f"{data_path.name}.{os.getpid()}.tmp")
    shape = (n, 3, image_size, image_size)
    members = [listing.members[i] for i in order]
    workers = _auto_workers(n) if workers is None else max(1, min(int(workers), n))
    chunk = max(1, min(256, -(-n // (workers * 4))))
    t0 = time.perf_counter()
    bad = []
    try:
        with open(tmp, "wb") as fh:
            fh.truncate(n * row)
        initargs = (listing.kind, str(listing.root), str(tmp), shape, image_size, draft, resample)
        desc = f"caching {listing.root.name} at {image_size}px ({resample})"
        with tqdm(total=n, unit="img", desc=desc, disable=not progress, smoothing=0.05) as bar:
            if workers == 1:
                _init_worker(*initargs)
                try:
                    for s in range(0, n, chunk):
                        bad += _decode_rows(s, members[s : s + chunk])
                        bar.update(len(members[s : s + chunk]))
                finally:
                    _WORKER.clear()
            else:
                pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=initargs + (True,))
                try:
                    jobs = {pool.submit(_decode_rows, s, members[s : s + chunk]): s for s in range(0, n, chunk)}
                    for job in as_completed(jobs):
                        bad += job.result()
                        bar.update(len(members[jobs[job] : jobs[job] + chunk]))
                finally:  # on Ctrl-C or an error, drop the queued chunks instead of decoding them all first
                    pool.shutdown(wait=True, cancel_futures=True)
        keep = np.ones(n, bool)
        keep[np.array([r for r, _, _ in bad], np.intp)] = False
        kept = int(keep.sum())
        if kept == 0:
            examples = "; ".join(f"{_where(listing, m)} {why}" for _, m, why in bad[:3])
            raise DataError(f"none of the {n:,} images in {listing.root} could be used: {examples}")
        if bad:  # close the gaps the skipped rows left, in place: row j moves from good[j] >= j
            good = np.flatnonzero(keep)
            mm = np.memmap(tmp, np.uint8, "r+", shape=shape)
            for j in range(0, kept, 1024):
                src = good[j : j + 1024]
                mm[j : j + len(src)] = mm[src]
            mm.flush()
            del mm
            os.truncate(tmp, kept * row)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())  # the data must be on disk before the rename makes it look complete
        os.replace(tmp, data_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - t0
    kept_order = order[keep]
    meta = dict(
        version=CACHE_VERSION, key=key, shape=[kept, 3, image_size, image_size], source=str(listing.root),
        kind=listing.kind, image_size=image_size, crop=CROP, resample=resample, draft=bool(draft),
        names=[listing.names[i] for i in kept_order], labels=listing.labels[kept_order].tolist(),
        skipped=[[m, why] for _, m, why in sorted(bad)], split_from=listing.split_from,
        seconds=round(seconds, 2), workers=workers,
    )
    tmp_meta = meta_path.with_name(f"{meta_path.name}.{os.getpid()}.tmp")
    try:
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_path)
    finally:
        tmp_meta.unlink(missing_ok=True)
    log.info("cached %d images in %.1f s (%.0f images/s, %d workers) at %s",
             n, seconds, n / seconds, workers, data_path)
    return meta


def _where(listing: Listing, member: str) -> str:
    """How to name one image of the source to the user: its path, or archive:member."""
    return str(listing.root / member) if listing.kind == "folder" else f"{listing.root}:{member}"


def _splits(images, meta) -> tuple:
    """Cut the cache into train/valid/test slices; an empty valid or test split is held out from train."""
    labels = np.asarray(meta["labels"], np.int64)
    names = np.asarray(meta["names"])
    counts = np.bincount(labels, minlength=3)
    ends = np.cumsum(counts)
    bounds = {"train": [0, ends[0]], "valid": [ends[0], ends[1]], "test": [ends[1], ends[2]]}
    messages = []
    for split in ("valid", "test"):
        if bounds[split][1] > bounds[split][0]:
            continue
        t0, t1 = bounds["train"]
        k = max(1, round(HELD_OUT * (t1 - t0)))
        if t1 - t0 - k < 1:
            raise DataError(
                f"{meta['source']}: no {split} images and too few training images ({t1 - t0}) to hold some out; "
                "add images, or delete the partition file to split by file name"
            )
        bounds[split] = [t1 - k, t1]
        bounds["train"] = [t0, t1 - k]
        messages.append(
            f"none of the images present is in the {split} split ({meta['split_from']}); holding out the last "
            f"{k:,} training images (by file name) as the {split} split"
        )
    if bounds["train"][1] <= bounds["train"][0]:
        raise DataError(
            f"{meta['source']}: none of the present images is a training image per {meta['split_from']}; "
            "add the training images, or delete the partition file to split by file name"
        )
    arrays = [ImageArray(images[a:b], names=names[a:b], name=s) for s, (a, b) in bounds.items()]
    return arrays, messages


def load_celeba(path, image_size: int = 64, cache_dir=None, limit: int | None = None, workers: int | None = None,
                progress: bool = True, draft: bool = False, resample: str = RESAMPLE) -> Dataset:
    """CelebA at ``path`` as memory-mapped uint8 train/valid/test splits, building the cache on first use.

    ``limit`` keeps the first N images by file name (quick runs); ``workers`` processes build the cache
    (default: one per core); ``cache_dir`` defaults to ``default_cache_dir``; ``draft`` and ``resample``
    (a ``RESAMPLE_FILTERS`` name, default bilinear) see ``preprocess``.
    """
    image_size = _check_image_size(image_size)
    resample_filter(resample)  # an unknown name fails before any listing or decoding
    listing = scan_celeba(path, limit)
    # Cache rows go by split then file name, so each split is one contiguous slice of the memory map.
    order = np.argsort(listing.labels, kind="stable")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(listing.root)
    data_path, meta_path = _cache_paths(cache_dir, listing, image_size, draft, resample)
    key = _cache_key(listing, order, image_size, draft, resample)
    opened, why = _open_cache(data_path, meta_path, key)
    built = opened is None
    if built:
        log.info("building the image cache %s: %s", data_path, why)
        try:
            _build_cache(listing, order, image_size, draft, resample, data_path, meta_path, key, workers, progress)
        except OSError as e:  # a full disk, a read-only one: the images themselves are only read
            raise DataError(f"cannot write the image cache in {cache_dir} ({e.strerror or e}); pass a cache_dir "
                            "(--cache-dir DIR) on a disk with room that you can write") from None
        opened, why = _open_cache(data_path, meta_path, key)
        if opened is None:
            raise DataError(f"the cache {data_path} just built cannot be opened ({why}); delete {cache_dir}, retry")
    images, meta = opened
    (train, valid, test), split_messages = _splits(images, meta)
    messages = list(listing.messages)
    if meta["skipped"]:
        n_bad = len(meta["skipped"])
        for member, why in meta["skipped"][:20]:
            log.warning("skipped %s: %s", _where(listing, member), why)
        messages.append(
            f"skipped {n_bad:,} of {n_bad + len(images):,} images that could not be used "
            f"(e.g. {meta['skipped'][0][0]}: {meta['skipped'][0][1]}); the full list is in {meta_path}"
        )
    messages += split_messages
    for m in messages:
        log.warning("%s", m)
    source = (
        f"CelebA {listing.kind} {listing.root} at {image_size}x{image_size} ({resample}): {len(images):,} images, "
        f"{meta['split_from']}"
    )
    return Dataset(train, valid, test, source, image_size, messages=messages, cache_path=data_path,
                   cache_built=built)


# --------------------------------------------------------------------------------------------------
# The built-in dataset


def load_synthetic(n_train: int, n_valid: int, image_size: int = 64, seed: int = 0,
                   n_test: int | None = None) -> Dataset:
    """Built-in synthetic faces as train/valid/test splits (test defaults to ``n_valid`` images).

    Each split has its own stream, ``(seed, 0|1|2)``; the factors that drew each face are in
    ``split.factors``. Logs ``SYNTHETIC_NOTICE`` once (WARNING) and sets it as ``.notice``.
    """
    image_size = _check_image_size(image_size)
    sizes = {"train": n_train, "valid": n_valid, "test": n_valid if n_test is None else n_test}
    splits = []
    for i, (name, n) in enumerate(sizes.items()):
        if int(n) < 1:
            raise DataError(f"the synthetic {name} split needs at least one image, got {n}")
        images, factors = synthetic_faces(int(n), image_size, seed=(seed, i))
        splits.append(ImageArray(images, factors=factors, name=name))
    log.warning("%s", SYNTHETIC_NOTICE)
    source = (
        f"synthetic faces (built-in, procedurally drawn, seed {seed}) at {image_size}x{image_size}: "
        + " / ".join(f"{k} {v:,}" for k, v in sizes.items())
    )
    return Dataset(*splits, source, image_size, notice=SYNTHETIC_NOTICE)


# --------------------------------------------------------------------------------------------------
# Batches


def as_batch(images, dtype=None):
    """uint8 images ``(B, 3, H, W)``, on the host or the device, as device floats in [0, 1] of ``dtype``
    (default: the default dtype).

    Host images cross to the device as uint8 (a quarter of the bytes of floats) and are scaled there.
    """
    if not backend.is_device_array(images):
        images = backend.to_device(np.ascontiguousarray(images))
    x = images.astype(dtype or backend.get_default_dtype())
    x /= 255  # a division gives the correctly rounded value for every level (0 -> 0.0, 255 -> 1.0)
    return x


DEVICE_SHARE = 0.25  # the most of the GPU's free memory a split may take to be kept there (``keep_on_device``)


def keep_on_device(images, share=DEVICE_SHARE, chunk_bytes=256 << 20):
    """The uint8 images copied to the GPU, if they take at most ``share`` of its free memory; else as they are.

    Kept there, a batch is one gather on the GPU (``Batches``): no host work and no transfer per step, where
    a GPU step lasts a few milliseconds. On the CPU, or when they do not fit, the images are returned
    unchanged (a memory map stays one; batches are then gathered on the host), and so they are if the GPU runs
    out of memory during the copy. Copied a chunk at a time, so that the host never holds more than
    ``chunk_bytes`` of a memory-mapped split in memory for the copy.
    """
    free = backend.device_free_memory()
    if backend.is_device_array(images) or free is None or not len(images) or images.nbytes > share * free:
        return images
    rows = max(1, chunk_bytes // images[0].nbytes)
    try:
        kept = backend.get_xp().empty(images.shape, dtype=images.dtype)
        for start in range(0, len(images), rows):
            kept[start:start + rows] = backend.to_device(np.ascontiguousarray(images[start:start + rows]))
    except MemoryError as e:  # (CuPy's OutOfMemoryError is one) another process took the memory meanwhile
        log.warning("the GPU ran out of memory while the images were copied to it (%s): they stay on the host", e)
        return images
    return kept


class Batches:
    """Mini-batches of one split, reshuffled each epoch from ``(seed, epoch)``.

    ``for x in Batches(ds.train, 64).epoch(e)`` yields device floats ``(B, 3, H, W)`` in [0, 1].
    ``epoch(e, start=k)`` resumes at batch k with exactly the batches an uninterrupted run had.
    Within a batch the rows are in ascending index order (a memory map reads fastest in order); which
    rows share a batch is what the shuffle decides.
    """

    def __init__(self, data, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        images = data.images if isinstance(data, ImageArray) else data
        if not hasattr(images, "shape") or images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
            raise DataError(
                "Batches needs a split (ImageArray) or a uint8 array of shape (n, 3, H, W); got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
            )
        self.images = images
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        if self.batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if len(self) == 0:
            raise DataError(
                f"batch size {self.batch_size} is larger than the split ({len(images)} images), so drop_last leaves "
                "no batch; use a smaller batch size, more images, or drop_last=False"
            )

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the image indices (the identity without shuffling); host int64."""
        n = len(self.images)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(backend.seed_to_int((self.seed, int(epoch)))).permutation(n)

    def indices(self, epoch: int) -> list:
        """The index arrays of the epoch's batches, each sorted ascending."""
        perm, b = self.order(epoch), self.batch_size
        return [np.sort(perm[i * b : (i + 1) * b]) for i in range(len(self))]

    def epoch(self, epoch: int = 0, start: int = 0):
        """Yield the epoch's batches from batch ``start`` on, as device floats in [0, 1].

        Images kept on the device (``keep_on_device``) are gathered there: the epoch's indices cross to the
        device once, and each batch is then a gather and a scaling on the device.
        """
        if not 0 <= int(start) <= len(self):
            raise DataError(f"start batch must be in 0..{len(self)}, got {start}")
        b = self.batch_size
        if not self.shuffle:  # contiguous slices: no gather at all
            for i in range(int(start), len(self)):
                yield as_batch(self.images[i * b : (i + 1) * b])
            return
        indices = self.indices(epoch)[int(start):]
        if backend.is_device_array(self.images) and indices:
            everything = backend.to_device(np.concatenate(indices))
            ends = np.cumsum([len(idx) for idx in indices])
            indices = [everything[end - len(idx) : end] for idx, end in zip(indices, ends)]
        for idx in indices:
            yield as_batch(self.images[idx])  # one vectorised gather, from the memory map or on the device
