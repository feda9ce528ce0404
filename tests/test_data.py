"""Tests of scratchvae.data and scratchvae.faces on small fixtures made here, plus the real CelebA sample.

The fixtures are 178x218 JPEGs written with Pillow (smooth random colour fields with some sharp edges,
so that crop and filter mistakes change pixels). Every cache goes to tmp_path.
"""
from __future__ import annotations

import colorsys
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchvae import backend, data
from scratchvae.data import Batches, DataError, load_celeba, load_synthetic
from scratchvae.faces import CATEGORICAL, CONTINUOUS, FACTOR_NAMES, render_faces, sample_factors, synthetic_faces
from strict_device import use_strict_device

SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/celeba"
W, H = 178, 218


def _picture(seed: int) -> Image.Image:
    """A 178x218 test picture: a smooth random colour field plus a sharp-edged rectangle."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (7, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((W, H), Image.Resampling.BICUBIC)).copy()
    y, x = g.integers(20, 150), g.integers(10, 110)
    img[y : y + 40, x : x + 50] = g.integers(0, 256, 3)
    return Image.fromarray(img)


def write_jpegs(folder: Path, ids, size=(W, H)) -> list:
    """Write CelebA-named JPEGs for ``ids`` into ``folder``; return their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in ids:
        name = f"{i:06d}.jpg"
        pic = _picture(i)
        (pic if pic.size == size else pic.resize(size)).save(folder / name, quality=90)
        names.append(name)
    return names


def write_partition(path: Path, labels: dict) -> None:
    path.write_text("".join(f"{name} {lab}\n" for name, lab in labels.items()))


def reference(path, size=64) -> np.ndarray:
    """The preprocessing done directly with Pillow: 148x148 centre crop, bilinear resize, as (3, H, W)."""
    img = Image.open(path).convert("RGB").crop((15, 35, 163, 183)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


def load(path, cache, **kw):
    kw.setdefault("workers", 1)
    return load_celeba(path, cache_dir=cache, progress=False, **kw)


# ----------------------------------------------------------------------------------------------- layouts


def test_plain_folder_splits_by_name_and_matches_pillow(tmp_path):
    names = write_jpegs(tmp_path / "faces", range(1, 31))
    ds = load(tmp_path / "faces", tmp_path / "cache")
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (24, 3, 3)
    assert list(ds.train.names) + list(ds.valid.names) + list(ds.test.names) == names
    for split in ds.splits.values():
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (3, 64, 64)
        for name, img in zip(split.names, split.images):
            np.testing.assert_array_equal(img, reference(tmp_path / "faces" / name))
    small = load(tmp_path / "faces", tmp_path / "cache", image_size=32)
    np.testing.assert_array_equal(small.valid.images[0], reference(tmp_path / "faces" / names[24], 32))


def test_img_align_celeba_subfolder(tmp_path):
    names = write_jpegs(tmp_path / "root" / "img_align_celeba", range(1, 11))
    ds = load(tmp_path / "root", tmp_path / "cache")
    assert ds.cache_path.parent == tmp_path / "cache"
    assert list(ds.train.names) == names[:8]
    np.testing.assert_array_equal(ds.test.images[0], reference(tmp_path / "root/img_align_celeba" / names[9]))


def test_torchvision_layout_honours_the_partition_file(tmp_path):
    folder = tmp_path / "root" / "celeba" / "img_align_celeba"
    names = write_jpegs(folder, range(1, 16))
    # Interleaved on purpose: the split must follow the file, not the name order.
    labels = {name: (0, 1, 2, 0, 0)[i % 5] for i, name in enumerate(names)}
    write_partition(tmp_path / "root" / "celeba" / "list_eval_partition.txt", labels)
    ds = load(tmp_path / "root", tmp_path / "cache")
    for k, split in enumerate(("train", "valid", "test")):
        expected = [n for n in names if labels[n] == k]
        assert list(ds.splits[split].names) == expected
        np.testing.assert_array_equal(ds.splits[split].images[-1], reference(folder / expected[-1]))
    assert "official split" in ds.source and not ds.messages


def test_zip_is_read_in_place(tmp_path):
    names = write_jpegs(tmp_path / "src", range(1, 13))
    z = tmp_path / "dl" / "img_align_celeba.zip"
    z.parent.mkdir()
    with zipfile.ZipFile(z, "w") as zf:
        for name in names:
            zf.write(tmp_path / "src" / name, f"img_align_celeba/{name}")
        zf.writestr("__MACOSX/img_align_celeba/._000001.jpg", b"resource fork, not an image")
    labels = {n: int(i >= 10) + int(i >= 11) for i, n in enumerate(names)}  # 10 train, 1 valid, 1 test
    write_partition(tmp_path / "dl" / "list_eval_partition.txt", labels)
    for path, workers in ((z, 2), (tmp_path / "dl", 1)):  # the zip itself, or the folder holding it
        ds = load(path, tmp_path / "cache", workers=workers)
        assert ds.source.startswith("CelebA zip")
        assert (len(ds.train), len(ds.valid), len(ds.test)) == (10, 1, 1)
        for name, img in zip(ds.train.names, ds.train.images):
            np.testing.assert_array_equal(img, reference(tmp_path / "src" / name))
    assert sorted(p.name for p in z.parent.iterdir()) == ["img_align_celeba.zip", "list_eval_partition.txt"]


# ------------------------------------------------------------------------------------------- partitions


def test_partition_naming_absent_images_uses_those_present(tmp_path, caplog):
    folder = tmp_path / "celeba"
    present = write_jpegs(folder, range(1, 21))
    labels = {f"{i:06d}.jpg": 0 if i <= 30 else 1 if i <= 35 else 2 for i in range(1, 41)}  # 1..40 listed
    labels.update({n: 1 for n in present[16:]})  # the last 4 present images are validation images
    write_partition(folder / "list_eval_partition.txt", labels)
    with caplog.at_level(logging.WARNING, logger="scratchvae.data"):
        ds = load(folder, tmp_path / "cache")
    # Absent: ids 21-30 (train), 31-35 (valid), 36-40 (test).
    missing = [m for m in ds.messages if "not in" in m]
    assert len(missing) == 1 and "20 are not in" in missing[0] and "train 10 / valid 5 / test 5" in missing[0]
    # No test image is present: the last 10% of the training images are held out, and the user is told.
    assert len(ds.valid) == 4 and list(ds.test.names) == present[14:16] and len(ds.train) == 14
    assert any("test split" in m and "holding out the last 2" in m for m in ds.messages)
    assert sum("holding out" in r.getMessage() for r in caplog.records) == 1


def test_kaggle_csv_partition_and_unlisted_images(tmp_path):
    names = write_jpegs(tmp_path / "d", range(1, 9))
    (tmp_path / "d" / "list_eval_partition.csv").write_text(
        "image_id,partition\n" + "".join(f"{n},{(0, 0, 0, 0, 1, 2)[i]}\n" for i, n in enumerate(names[:6]))
    )
    ds = load(tmp_path / "d", tmp_path / "cache")
    assert list(ds.train.names) == names[:4] + names[6:]
    assert any("2 of 8 images are not in" in m for m in ds.messages)


def test_malformed_partition_file_is_named(tmp_path):
    names = write_jpegs(tmp_path / "d", range(1, 5))
    (tmp_path / "d" / "list_eval_partition.txt").write_text(f"{names[0]} 0\n{names[1]} train\n")
    with pytest.raises(DataError, match=r"list_eval_partition.txt, line 2: .*re-download"):
        load(tmp_path / "d", tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ cache


def test_cache_is_reused_then_rebuilt_when_an_image_changes(tmp_path):
    folder = tmp_path / "d"
    names = write_jpegs(folder, range(1, 11))
    first = load(folder, tmp_path / "cache")
    assert first.cache_built and isinstance(first.train.images, np.memmap)
    again = load(folder, tmp_path / "cache")
    assert not again.cache_built and again.cache_path == first.cache_path
    np.testing.assert_array_equal(np.asarray(again.train.images), np.asarray(first.train.images))

    _picture(99).save(folder / names[0], quality=90)  # new pixels in the same file
    os.utime(folder / names[0], ns=(1, 1))  # a distinct date even on a coarse-clock file system
    changed = load(folder, tmp_path / "cache")
    assert changed.cache_built
    np.testing.assert_array_equal(changed.train.images[0], reference(folder / names[0]))
    assert not np.array_equal(changed.train.images[0], first.train.images[0])

    write_partition(folder / "list_eval_partition.txt", {n: i % 3 for i, n in enumerate(names)})
    resplit = load(folder, tmp_path / "cache")
    assert resplit.cache_built and len(resplit.test) == 3
    assert load(folder, tmp_path / "cache", image_size=32).cache_built  # another size is another cache


@pytest.mark.parametrize("damage", ["truncate_data", "delete_meta", "garbage_meta", "delete_data"])
def test_half_written_cache_is_rebuilt_not_used(tmp_path, damage):
    folder = tmp_path / "d"
    write_jpegs(folder, range(1, 8))
    ds = load(folder, tmp_path / "cache")
    good = np.array(ds.train.images)
    data_path, meta_path = ds.cache_path, ds.cache_path.with_suffix(".json")
    del ds
    if damage == "truncate_data":
        os.truncate(data_path, data_path.stat().st_size // 2)
    elif damage == "delete_meta":
        meta_path.unlink()
    elif damage == "garbage_meta":
        meta_path.write_text("{not json")
    else:
        data_path.unlink()
    again = load(folder, tmp_path / "cache")
    assert again.cache_built
    np.testing.assert_array_equal(again.train.images, good)


def test_interrupted_build_leaves_no_usable_cache(tmp_path, monkeypatch):
    folder = tmp_path / "d"
    names = write_jpegs(folder, range(1, 8))
    real, calls = data._decode_rows, []

    def dies_midway(start, members):
        calls.append(start)
        if len(calls) == 2:  # the serial build decodes 7 images in chunks of 2
            raise KeyboardInterrupt
        return real(start, members)

    monkeypatch.setattr(data, "_decode_rows", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        load(folder, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no temporary file, no metadata
    monkeypatch.setattr(data, "_decode_rows", real)
    ds = load(folder, tmp_path / "cache")
    assert ds.cache_built and len(ds.train) + len(ds.valid) + len(ds.test) == 7

    # Temporary files of this cache: one from a dead build (no such process id), one from a live one (pid 1).
    dead = ds.cache_path.with_name(ds.cache_path.name + ".999999999.tmp")
    live = ds.cache_path.with_name(ds.cache_path.name + ".1.tmp")
    dead.write_bytes(b"\0" * 10)
    live.write_bytes(b"\0" * 10)
    os.utime(folder / names[0], ns=(1, 1))  # makes the cache stale, so the next load rebuilds
    assert load(folder, tmp_path / "cache").cache_built
    assert not dead.exists() and live.exists()


def test_corrupt_truncated_and_wrong_size_files_are_skipped(tmp_path, caplog):
    folder = tmp_path / "d"
    names = write_jpegs(folder, range(1, 21))
    (folder / names[3]).write_bytes(b"this is not a jpeg")
    raw = (folder / names[7]).read_bytes()
    (folder / names[7]).write_bytes(raw[: len(raw) // 2])
    write_jpegs(folder, [12], size=(100, 120))
    with caplog.at_level(logging.WARNING, logger="scratchvae.data"):
        two = load(folder, tmp_path / "cache2", workers=2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert str(folder / names[3]) in logged and "corrupt or truncated" in logged
    assert str(folder / names[7]) in logged
    assert str(folder / names[11]) in logged and "100x120" in logged
    assert any("skipped 3 of 20 images" in m for m in two.messages)
    kept = [n for i, n in enumerate(names) if i not in (3, 7, 11)]
    assert list(two.train.names) + list(two.valid.names) + list(two.test.names) == kept
    for name, img in zip(two.train.names, two.train.images):
        np.testing.assert_array_equal(img, reference(folder / name))
    one = load(folder, tmp_path / "cache1", workers=1)  # the serial build gives the same cache
    np.testing.assert_array_equal(np.asarray(one.train.images), np.asarray(two.train.images))
    np.testing.assert_array_equal(np.asarray(one.test.images), np.asarray(two.test.images))
    assert not load(folder, tmp_path / "cache2").cache_built  # skipped files do not make the cache stale
    meta = json.loads(two.cache_path.with_suffix(".json").read_text())
    assert [m for m, _ in meta["skipped"]] == [names[3], names[7], names[11]]


def test_all_files_unusable_is_an_error(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(1, 4):
        (tmp_path / "d" / f"{i:06d}.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.raises(DataError, match=r"none of the 3 images .*000001.jpg cannot be decoded"):
        load(tmp_path / "d", tmp_path / "cache")
    assert not any(p.suffix == ".json" for p in (tmp_path / "cache").iterdir())


def test_default_cache_dir_avoids_read_only_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "d"
    write_jpegs(folder, range(1, 4))
    assert data.default_cache_dir(folder) == folder / ".scratchvae-cache"
    folder.chmod(0o555)  # no write bits: left alone even by root, who could write anyway
    try:
        assert data.default_cache_dir(folder) == tmp_path / "xdg" / "scratchvae"
        ds = load_celeba(folder, progress=False, workers=1)
        assert ds.cache_path.parent == tmp_path / "xdg" / "scratchvae"
        assert sorted(p.name for p in folder.iterdir()) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_paths_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*synthetic"):
        load(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty\).*img_align_celeba.zip"):
        load(tmp_path / "empty", tmp_path / "cache")
    with zipfile.ZipFile(tmp_path / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "no images here")
    with pytest.raises(DataError, match=r"notes.zip holds no .jpg images.*re-download"):
        load(tmp_path / "notes.zip", tmp_path / "cache")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match=r"file.txt is a file but not a zip"):
        load(tmp_path / "file.txt", tmp_path / "cache")
    write_jpegs(tmp_path / "two", range(1, 3))
    with pytest.raises(DataError, match=r"holds 2 image\(s\); at least 3"):
        load(tmp_path / "two", tmp_path / "cache")
    with pytest.raises(DataError, match=r"image_size must be an integer from 8 to 148"):
        load(tmp_path / "two", tmp_path / "cache", image_size=256)


# ---------------------------------------------------------------------------------------------- batches


def numbered(n: int) -> np.ndarray:
    """n uint8 images whose every pixel holds the image's own index."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 3, 4, 4)).copy()


def seen(x) -> np.ndarray:
    return np.rint(np.asarray(x)[:, 0, 0, 0] * 255).astype(int)


@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_yield_every_index_once_per_epoch(drop_last):
    batches = Batches(numbered(37), 8, seed=3, drop_last=drop_last)
    assert len(batches) == (4 if drop_last else 5)
    for epoch in (0, 1):
        xs = list(batches.epoch(epoch))
        assert len(xs) == len(batches)
        for x in xs:
            assert x.dtype == np.float32 and x.min() >= 0 and x.max() <= 1
            assert np.all(np.asarray(x) == np.asarray(x)[:, :, :1, :1])  # whole images, not mixed rows
        got = np.concatenate([seen(x) for x in xs])
        assert len(set(got)) == len(got) == (32 if drop_last else 37)
        assert [list(seen(x)) for x in xs] == [list(i) for i in batches.indices(epoch)]
    assert not np.array_equal(batches.order(0), batches.order(1))  # reshuffled each epoch


def test_batches_are_reproducible_and_resume_mid_epoch():
    images = numbered(50)
    a, b = Batches(images, 10, seed=7), Batches(images, 10, seed=7)
    full = [seen(x) for x in a.epoch(2)]
    np.testing.assert_array_equal(np.concatenate(full), np.concatenate([seen(x) for x in b.epoch(2)]))
    resumed = [seen(x) for x in b.epoch(2, start=3)]
    assert [list(r) for r in resumed] == [list(f) for f in full[3:]]
    other = Batches(images, 10, seed=8)
    assert not np.array_equal(other.order(2), a.order(2))
    plain = Batches(images, 10, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([seen(x) for x in plain.epoch(5)]), np.arange(50))


def test_batches_from_a_split_and_bad_arguments(tmp_path):
    write_jpegs(tmp_path / "d", range(1, 11))
    ds = load(tmp_path / "d", tmp_path / "cache")
    (x,) = list(Batches(ds.train, 8, seed=0).epoch(0))  # the whole split, rows in ascending order
    np.testing.assert_array_equal(np.asarray(x), ds.train.images.astype(np.float32) / 255)
    with pytest.raises(DataError, match=r"larger than the split \(8 images\).*drop_last=False"):
        Batches(ds.train, 9)
    assert len(Batches(ds.train, 9, drop_last=False)) == 1
    with pytest.raises(DataError, match=r"uint8 array of shape \(n, 3, H, W\)"):
        Batches(np.zeros((4, 3, 8, 8), np.float32), 2)


def test_batches_live_on_the_device():
    with use_strict_device():  # the tests' stand-in for CuPy: device arrays that refuse host arrays
        xs = list(Batches(numbered(10), 4, seed=1).epoch(0)) + list(Batches(numbered(10), 4, shuffle=False).epoch(0))
        assert all(backend.is_device_array(x) and x.dtype == np.float32 for x in xs)
        assert backend.is_device_array(xs[0] * backend.get_xp().ones(1, np.float32))  # mixes with device arrays


def counting_transfers(monkeypatch):
    """Patch ``backend.to_device`` to note its calls (each a host -> device copy): a list of (dtype, size)."""
    calls, to_device = [], backend.to_device
    monkeypatch.setattr(backend, "to_device",
                        lambda a, dtype=None: calls.append((np.asarray(a).dtype, np.size(a))) or to_device(a, dtype))
    return calls


@pytest.mark.parametrize("shuffle, drop_last", [(True, True), (True, False), (False, False)])
def test_a_split_kept_on_the_device_gives_the_host_batches_with_one_transfer_an_epoch(monkeypatch, shuffle, drop_last):
    images = numbered(37)
    kinds = dict(shuffle=shuffle, seed=3, drop_last=drop_last)
    host = [np.asarray(x) for x in Batches(images, 8, **kinds).epoch(2, start=1)]
    with use_strict_device():
        monkeypatch.setattr(backend, "device_free_memory", lambda: 4 * images.nbytes)
        kept = data.keep_on_device(images, chunk_bytes=5 * images[0].nbytes)  # copied in 8 chunks of 5 images
        assert backend.is_device_array(kept) and np.array_equal(np.asarray(kept), images)
        transfers = counting_transfers(monkeypatch)
        on_device = list(Batches(kept, 8, **kinds).epoch(2, start=1))
        assert all(backend.is_device_array(x) for x in on_device)
        # shuffled: the epoch's indices cross once (those of batches 1.. only); in order: nothing crosses
        assert transfers == ([(np.dtype(np.int64), sum(len(x) for x in host))] if shuffle else [])
        transfers.clear()
        from_host = list(Batches(images, 8, **kinds).epoch(2, start=1))
        assert transfers == [(np.dtype(np.uint8), x.size) for x in host]  # from the host: every batch, as uint8
    assert len(on_device) == len(host) == (3 if drop_last else 4)
    for a, b, c in zip(host, on_device, from_host):
        np.testing.assert_array_equal(np.asarray(b), a)
        np.testing.assert_array_equal(np.asarray(c), a)


def test_a_split_stays_on_the_host_on_the_cpu_or_when_it_does_not_fit(monkeypatch, caplog):
    images = numbered(10)
    assert data.keep_on_device(images) is images  # the CPU: nothing to copy
    with use_strict_device():
        monkeypatch.setattr(backend, "device_free_memory", lambda: 4 * images.nbytes - 1)
        assert data.keep_on_device(images) is images  # more than a quarter of the free memory
        assert backend.is_device_array(data.keep_on_device(images, share=0.5))
        monkeypatch.setattr(backend, "device_free_memory", lambda: None)
        assert data.keep_on_device(images) is images
        monkeypatch.setattr(backend, "device_free_memory", lambda: 2**30)
        empty = images[:0]
        assert data.keep_on_device(empty) is empty  # an empty split is left for Batches to refuse, clearly

        def out_of_memory(*args):
            raise MemoryError("out of memory while allocating 4,096 bytes")  # what CuPy's OutOfMemoryError is
        monkeypatch.setattr(backend, "to_device", out_of_memory)
        assert data.keep_on_device(images, chunk_bytes=images[0].nbytes) is images  # the host's, not half a copy
    assert "the GPU ran out of memory while the images were copied to it" in caplog.text


# -------------------------------------------------------------------------------------- synthetic faces


def test_synthetic_faces_are_deterministic_images():
    x, f = synthetic_faces(40, 64, seed=5)
    y, g = synthetic_faces(40, 64, seed=5)
    assert x.dtype == np.uint8 and x.shape == (40, 3, 64, 64)
    np.testing.assert_array_equal(x, y)
    assert all(np.array_equal(f[k], g[k]) for k in FACTOR_NAMES)
    assert not np.array_equal(synthetic_faces(40, 64, seed=6)[0], x)
    # Real images, not blank ones: a wide range of values in each, and faces that differ from each other.
    assert np.all(x.reshape(40, -1).max(1).astype(int) - x.reshape(40, -1).min(1) > 100)
    assert len({im.tobytes() for im in x}) == 40
    assert synthetic_faces(3, 32, seed=5)[0].shape == (3, 3, 32, 32)


def test_synthetic_factor_labels_describe_the_images():
    f = sample_factors(500, seed=1)
    assert set(f) == set(FACTOR_NAMES)
    for k, (lo, hi) in CONTINUOUS.items():
        assert f[k].shape == (500,) and lo <= f[k].min() and f[k].max() <= hi
    for k, names in CATEGORICAL.items():
        assert set(np.unique(f[k])) == set(range(len(names)))  # 500 draws reach every category

    f = {k: v[:4].copy() for k, v in f.items()}
    img = render_faces(f).astype(int)
    for i in range(4):  # the top-left pixel is the background colour the hue factor names
        rgb = np.array(colorsys.hsv_to_rgb(float(f["background_hue"][i]), 0.35, 0.85)) * 255
        assert np.abs(img[i, :, 0, 0] - rgb).max() <= 1

    def centre_x(images):  # mean column of the pixels that differ from the background
        fg = np.abs(images - images[:, :, :1, :1]).sum(1) > 30
        return np.array([np.nonzero(m)[1].mean() for m in fg])

    left, right = dict(f, head_x=np.full(4, -0.1, np.float32)), dict(f, head_x=np.full(4, 0.1, np.float32))
    shift = centre_x(render_faces(right).astype(int)) - centre_x(render_faces(left).astype(int))
    assert np.all(np.abs(shift - 0.2 * 32) < 1.0)  # 0.2 half-widths = 6.4 pixels at 64x64

    frown, smile = dict(f, smile=np.full(4, -0.6, np.float32)), dict(f, smile=np.full(4, 1.0, np.float32))
    diff = np.abs(render_faces(frown).astype(int) - render_faces(smile)).sum(1)
    rows = np.nonzero(diff.any(axis=(0, 2)))[0]
    assert rows.size and rows.min() > 32  # only the lower half of the face (the mouth) changes

    bald = dict(f, hair_style=np.full(4, CATEGORICAL["hair_style"].index("bald")))
    short = dict(f, hair_style=np.full(4, CATEGORICAL["hair_style"].index("short")))
    diff = np.abs(render_faces(bald).astype(int) - render_faces(short)).sum(1)
    rows = np.nonzero(diff.any(axis=(0, 2)))[0]
    assert rows.size and rows.max() < 32  # the hair is on top of the head


def test_load_synthetic_tells_the_user_once(caplog):
    with caplog.at_level(logging.WARNING, logger="scratchvae.data"):
        ds = load_synthetic(20, 6, image_size=32, seed=4)
    notices = [r.getMessage() for r in caplog.records if "SYNTHETIC" in r.getMessage()]
    assert notices == [data.SYNTHETIC_NOTICE] and ds.notice == data.SYNTHETIC_NOTICE
    assert "\n" not in ds.notice and "img_align_celeba" in ds.notice
    assert "synthetic" in ds.source
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (20, 6, 6)
    images, factors = synthetic_faces(20, 32, seed=(4, 0))
    np.testing.assert_array_equal(ds.train.images, images)
    np.testing.assert_array_equal(ds.train.factors["smile"], factors["smile"])
    assert not np.array_equal(ds.valid.images, ds.test.images)  # the splits draw from separate streams


# ------------------------------------------------------------------------------------------ real sample


@pytest.mark.skipif(not (SAMPLE / "list_eval_partition.txt").is_file(), reason="no CelebA sample in ../shared")
def test_real_celeba_sample(tmp_path):
    table = data.read_partition((SAMPLE / "list_eval_partition.txt").read_text(), "list_eval_partition.txt")
    assert np.bincount(list(table.values())).tolist() == [162_770, 19_867, 19_962]  # the official split
    listing = data.scan_celeba(SAMPLE)
    counts = np.bincount(listing.labels, minlength=3)
    assert counts.sum() == len(list(SAMPLE.glob("*.jpg")))
    assert counts[2] == 0  # the sample holds no test-split images
    assert any(f"{202_599 - counts.sum():,} are not in" in m for m in listing.messages)

    ds = load_celeba(SAMPLE, cache_dir=tmp_path, limit=48, workers=2, progress=False)
    assert len(ds.train) + len(ds.valid) + len(ds.test) == 48 and len(ds.test) > 0
    for name, img in zip(ds.test.names, ds.test.images):
        np.testing.assert_array_equal(img, reference(SAMPLE / name))

    # Draft decoding (opt-in) against the full decode: the figures preprocess() documents.
    diffs = []
    for name in listing.names[:: max(1, len(listing.names) // 40)][:40]:
        with Image.open(SAMPLE / name) as im:
            fast = data.preprocess(im, 64, draft=True).astype(int)
        diffs.append(np.abs(fast - reference(SAMPLE / name)))
    d = np.stack(diffs)
    assert 0.5 < d.mean() < 2.5 and 0.55 < (d <= 1).mean() < 0.85  # not within one grey level: off by default
