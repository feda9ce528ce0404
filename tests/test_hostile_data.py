"""Hostile input, data: odd images, odd files, damaged archives, tiny and empty data sets, and data that changed
under a run. Tiny CelebA-like folders (a dozen 178x218 JPEGs, 16-pixel images, the cache in the test's folder).

Each case asserts the exit status, the message's key words and that the user's files (the images, the cache,
the run folder) are as they were, or, for a file that is merely skipped, that the run goes on and says so.
"""
import io
import os
import zipfile
from pathlib import Path

import numpy
import pytest
from PIL import Image

from hostile_kit import (PER_EPOCH, celeba_args, changes, fast_figures, faces, finished_run, main,  # noqa: F401
                         picture, snapshot, tiny)
from scratchvae import data


def run(tmp_path, source, *more, out="run"):
    return main(*celeba_args(source, tmp_path / "cache", tmp_path / out, "--epochs", 1, *more))


# ---- one odd image among good ones: skipped or converted, never fatal ----------------------------------------------

def _grey16(path):
    """Issue 11: a 16-bit greyscale PNG, levels spread over 0..65535."""
    levels = numpy.asarray(picture(99).convert("L"), dtype=numpy.uint16) * 257
    Image.fromarray(levels).save(path)


MODES = {  # file name: (how to write it, "used" or the skip message's key words)
    "16-bit greyscale PNG": ("000013.png", _grey16, "used"),
    "palette PNG": ("000013.png", lambda p: picture(98).convert("P").save(p), "used"),
    "RGBA PNG": ("000013.png", lambda p: picture(97).convert("RGBA").save(p), "used"),
    "greyscale JPEG": ("000013.jpg", lambda p: picture(96).convert("L").save(p), "used"),
    "CMYK JPEG": ("000013.jpg", lambda p: picture(95).convert("CMYK").save(p), "used"),
    "1-bit PNG": ("000013.png", lambda p: picture(94).convert("1").save(p), "used"),
    "upper-case extension": ("000013.JPG", lambda p: picture(93).save(p, format="JPEG"), "used"),
    "wrong size (img_celeba)": ("000013.jpg", lambda p: picture(92, (100, 120)).save(p), "not the 178x218"),
    "truncated JPEG": ("000013.jpg", lambda p: p.write_bytes(_jpeg_bytes(91)[:700]), "corrupt or truncated"),
    "zero-byte JPEG": ("000013.jpg", lambda p: p.write_bytes(b""), "corrupt or truncated"),
    "text named .jpg": ("000013.jpg", lambda p: p.write_text("not an image"), "corrupt or truncated"),
}


def _jpeg_bytes(seed):
    b = io.BytesIO()
    picture(seed).save(b, format="JPEG")
    return b.getvalue()


@pytest.mark.parametrize("kind", list(MODES))
def test_one_odd_image_among_good_ones(tmp_path, kind, caplog):
    name, write, outcome = MODES[kind]
    source = faces(tmp_path / "faces")
    write(source / name)
    before = snapshot(source)
    ds = data.load_celeba(source, image_size=16, cache_dir=tmp_path / "cache", workers=1, progress=False)
    names = [str(n) for s in ds.splits.values() for n in s.names]
    if outcome == "used":
        assert name in names and len(names) == 13
        split = next(s for s in ds.splits.values() if name in list(s.names))
        image = split.images[list(split.names).index(name)]
        with Image.open(source / name) as img:  # what Pillow makes of it, 16-bit levels scaled down to 8 bits
            reference = data.preprocess(img, 16)
        numpy.testing.assert_array_equal(image, reference)
        if kind == "16-bit greyscale PNG":  # it was cached all white (every level clipped at 255)
            eight_bit = data.preprocess(picture(99).convert("L"), 16)
            assert image.min() < 200 and numpy.abs(image.astype(int) - eight_bit).max() <= 1
    else:
        assert name not in names and len(names) == 12
        assert outcome in caplog.text and name in caplog.text
    assert changes(before, snapshot(source)) == []


@pytest.mark.parametrize("kind", ["a folder named x.jpg", "a dangling symlink", "a FIFO", "a macOS ._ file",
                                  "a symlink to a good image"])
def test_odd_entries_in_the_image_folder(tmp_path, kind):
    source = faces(tmp_path / "faces")
    odd = source / "000013.jpg"
    if kind == "a folder named x.jpg":
        odd.mkdir()
    elif kind == "a dangling symlink":
        odd.symlink_to(tmp_path / "gone.jpg")
    elif kind == "a FIFO":
        os.mkfifo(odd)
    elif kind == "a macOS ._ file":
        (source / "._000001.jpg").write_bytes(b"\0\5\26\7")
    else:
        picture(13).save(tmp_path / "elsewhere.jpg")
        odd.symlink_to(tmp_path / "elsewhere.jpg")
    r = run(tmp_path, source)
    assert r.code == 0, r
    expected = 13 if kind == "a symlink to a good image" else 12
    assert f"{expected} images" in r.out


# ---- data that cannot be used at all: status 2, nothing written ---------------------------------------------------

def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, payload in members.items():
            z.writestr(name, payload)
    return path


def _truncated_zip(folder):
    source = faces(folder / "src")
    z = _zip(folder / "img_align_celeba.zip",
             {f"img_align_celeba/{p.name}": p.read_bytes() for p in sorted(source.iterdir())})
    z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    return z


def _source(tmp_path, kind):
    """The --data path of ``kind``; returns (path, key words of the message)."""
    t = tmp_path / "data"
    t.mkdir()
    if kind == "truncated zip, given directly":
        return _truncated_zip(t), ["damaged or incomplete", "re-download"]
    if kind == "truncated zip, given its folder":
        _truncated_zip(t)
        return t, ["damaged or incomplete", "re-download"]
    if kind == "zero-byte zip":
        (t / "img_align_celeba.zip").write_bytes(b"")
        return t / "img_align_celeba.zip", ["damaged or incomplete"]
    if kind == "zip without images":
        return _zip(t / "img_align_celeba.zip", {"README.txt": "hello"}), ["holds no .jpg images"]
    if kind == "a zip of wrong-size images only":
        b = io.BytesIO()
        picture(1, (64, 64)).save(b, format="JPEG")
        return _zip(t / "x.zip", {f"{i:06d}.jpg": b.getvalue() for i in range(1, 6)}), ["none of the 5 images",
                                                                                        "178x218"]
    if kind == "a text file":
        (t / "notes.txt").write_text("hello")
        return t / "notes.txt", ["a file but not a zip archive"]
    if kind == "one JPEG given as the data":
        picture(1).save(t / "000001.jpg")
        return t / "000001.jpg", ["a file but not a zip archive"]
    if kind == "an empty folder":
        return t, ["no celeba images found", "the folder is empty"]
    if kind == "a folder of other files":
        (t / "a.txt").write_text("x")
        return t, ["no celeba images found"]
    if kind == "two images":
        faces(t, n=12)
        for p in sorted(t.iterdir())[2:]:
            p.unlink()
        return t, ["holds 2 image(s)", "at least 3"]
    if kind == "every image damaged":
        for i in range(1, 6):
            (t / f"{i:06d}.jpg").write_bytes(b"\xff\xd8garbage")
        return t, ["none of the 5 images", "corrupt or truncated"]
    if kind == "a damaged partition file":
        faces(t)
        (t / "list_eval_partition.txt").write_text("000001.jpg 0\nthis is not a partition line\n")
        return t, ["list_eval_partition.txt, line 2", "delete it to split by file name"]
    if kind == "a partition file with no training image":
        faces(t)
        (t / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg 2\n" for i in range(1, 13)))
        return t, ["too few training images (0)", "delete the partition file"]
    if kind == "a path that does not exist":
        return t / "nothing-here", ["does not exist"]
    if kind == "a dangling symlink":
        (t / "link").symlink_to(t / "gone")
        return t / "link", ["does not exist"]
    if kind == "a symlink loop":
        (t / "loop").symlink_to(t / "loop")
        return t / "loop", ["does not exist"]
    if kind == "an empty --data":
        return "", ["--data is empty"]
    raise ValueError(kind)


BAD_SOURCES = ["truncated zip, given directly", "truncated zip, given its folder", "zero-byte zip",
               "zip without images", "a zip of wrong-size images only", "a text file", "one JPEG given as the data",
               "an empty folder", "a folder of other files", "two images", "every image damaged",
               "a damaged partition file", "a partition file with no training image", "a path that does not exist",
               "a dangling symlink", "a symlink loop", "an empty --data"]


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_data_that_cannot_be_used_is_named_and_nothing_is_written(tmp_path, kind):
    source, words = _source(tmp_path, kind)
    before = snapshot(tmp_path)
    r = run(tmp_path, source)
    assert r.code == 2 and r.says(*words), r
    assert not (tmp_path / "run").exists()
    assert [p for p in changes(before, snapshot(tmp_path)) if "/cache/" not in p] == []
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no temporary cache left behind


@pytest.mark.parametrize("kind", ["a failed data load keeps the old run under --force",
                                  "a bad --data on --resume keeps the run"])
def test_bad_data_never_costs_the_run_in_the_folder(tmp_path, kind):
    out = finished_run(tmp_path / "run")
    (tmp_path / "empty").mkdir()
    before = snapshot(out)
    flag = "--force" if "force" in kind else "--resume"
    r = tiny(out, "--epochs", 1, flag, "--data", tmp_path / "empty")
    assert r.code == 2 and r.says("cannot be resumed" if flag == "--resume" else "no celeba images found"), r
    assert changes(before, snapshot(out)) == []


# ---- tiny data sets -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, batch, code, words", [
    (3, 1, 0, ["3 images"]),               # the smallest folder that splits: one image each
    (12, 16, 2, ["larger than the split"]),  # batch larger than the ten training images
    (12, 10, 0, ["1 batches of 10"]),        # exactly one batch an epoch
])
def test_tiny_data_sets(tmp_path, n, batch, code, words):
    source = faces(tmp_path / "faces", n=12)
    for p in sorted(source.iterdir())[n:]:
        p.unlink()
    r = main(*celeba_args(source, tmp_path / "cache", tmp_path / "run", "--epochs", 1, "--batch-size", batch))
    assert r.code == code and r.says(*words), r
    if code:
        assert not (tmp_path / "run").exists()


def test_image_size_beyond_the_crop_is_refused(tmp_path):
    r = run(tmp_path, faces(tmp_path / "faces"), "--image-size", 160)
    assert r.code == 2 and r.says("image_size must be an integer from 8 to 148"), r
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_cache_dir_that_is_a_file(tmp_path):
    (tmp_path / "cache").write_text("mine")
    r = run(tmp_path, faces(tmp_path / "faces"))
    assert r.code == 2 and r.says("cannot create the cache folder"), r
    assert (tmp_path / "cache").read_text() == "mine"


@pytest.mark.parametrize("damage", ["metadata garbage", "images cut short", "metadata of another source"])
def test_a_damaged_cache_is_rebuilt_not_used(tmp_path, damage):
    source = faces(tmp_path / "faces")
    assert run(tmp_path, source, out="first").code == 0
    meta = next((tmp_path / "cache").glob("*.json"))
    cache = next((tmp_path / "cache").glob("*.u8"))
    if damage == "metadata garbage":
        meta.write_text("{not json")
    elif damage == "images cut short":
        cache.write_bytes(cache.read_bytes()[:100])
    else:
        meta.write_text(meta.read_text().replace('"key": "', '"key": "0'))
    r = run(tmp_path, source, out="second")
    assert r.code == 0, r
    first, second = (tmp_path / "first" / "log.csv").read_text(), (tmp_path / "second" / "log.csv").read_text()
    strip = lambda text: [line.rsplit(",", 1)[0] for line in text.splitlines()]  # noqa: E731  (not images/s)
    assert strip(first) == strip(second)  # the rebuilt cache holds the same pixels


# ---- the data changed under a run (issue 4) --------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ("41 images added", ["train: 16 images (checkpoint) vs 49 (now)"]),
    ("4 images removed", ["train: 16 images (checkpoint) vs 12 (now)"]),
    ("one image swapped for another", ["other files"]),
    ("a partition file added", ["valid: 2 images (checkpoint)"]),
])
def test_resume_on_changed_data_is_refused_with_the_difference(tmp_path, change, words):
    source = faces(tmp_path / "faces", n=20)
    out = tmp_path / "run"
    assert main(*celeba_args(source, tmp_path / "cache", out, "--epochs", 1)).code == 0
    if change == "41 images added":
        for i in range(21, 62):
            picture(i).save(source / f"{i:06d}.jpg", quality=85)
    elif change == "4 images removed":
        for p in sorted(source.iterdir())[-5:-1]:
            p.unlink()
    elif change == "one image swapped for another":
        (source / "000007.jpg").rename(source / "000007b.jpg")
    else:
        (source / "list_eval_partition.txt").write_text(
            "".join(f"{i:06d}.jpg {0 if i <= 14 else 1 if i <= 17 else 2}\n" for i in range(1, 21)))
    before = snapshot(out)
    r = main(*celeba_args(source, tmp_path / "cache", out, "--epochs", 2, "--resume"))
    assert r.code == 2 and r.says("the data changed", "cannot resume exactly", *words, "--force"), r
    assert changes(before, snapshot(out)) == []


def test_resume_on_the_same_data_is_accepted(tmp_path):
    source = faces(tmp_path / "faces", n=20)
    out = tmp_path / "run"
    assert main(*celeba_args(source, tmp_path / "cache", out, "--epochs", 1)).code == 0
    os.utime(source / "000003.jpg")  # touched, not changed: still the same data
    r = main(*celeba_args(source, tmp_path / "cache", out, "--epochs", 2, "--resume"))
    assert r.code == 0 and r.says("resuming"), r
