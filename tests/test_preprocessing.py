"""CelebA's preprocessing is the common CelebA-64 pipeline's, and the cache follows the resize filter.

The common pipeline (PyTorch-VAE and most CelebA-64 scripts) is torchvision's ``CenterCrop(148)`` then
``Resize(64)`` on a PIL image, which is Pillow's ``img.crop(box)`` then ``img.resize((64, 64), BILINEAR)``.
The reference below does exactly that with Pillow, computing the crop box as torchvision does, so the
test does not lean on scratchvae's own ``crop_box``. Caches go to tmp_path.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scratchvae import backend, data, train
from scratchvae.data import DataError, load_celeba

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared/data/celeba"
HAVE_SAMPLE = (SAMPLE / "list_eval_partition.txt").is_file()
W, H = 178, 218

from cli_module import cli  # noqa: E402


def torchvision_way(path, size=64, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    """CenterCrop(148) as torchvision rounds its box, then Pillow's resize, as uint8 (3, size, size)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        top, left = int(round((h - 148) / 2.0)), int(round((w - 148) / 2.0))
        out = img.crop((left, top, left + 148, top + 148)).resize((size, size), resample)
    return np.asarray(out).transpose(2, 0, 1)


def write_faces(folder: Path, n: int) -> list:
    """``n`` CelebA-named 178x218 JPEGs with fine stripes and sharp edges, where resize filters disagree."""
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(22)
    yy, xx = np.mgrid[0:H, 0:W]
    names = []
    for i in range(1, n + 1):
        img = (g.integers(0, 256, (1, 1, 3)) * (0.5 + 0.5 * np.sin(xx * (0.3 + 0.05 * i) + yy * 0.2))[..., None])
        y, x = g.integers(30, 150), g.integers(10, 110)
        img[y : y + 30, x : x + 40] = g.integers(0, 256, 3)
        names.append(f"{i:06d}.jpg")
        Image.fromarray(img.astype(np.uint8)).save(folder / names[-1], quality=95)
    return names


def load(folder, cache, **kw):
    return load_celeba(folder, cache_dir=cache, workers=1, progress=False, **kw)


def all_images(ds):
    """The names and images of all three splits, in cache order."""
    names = [n for s in ds.splits.values() for n in s.names]
    return names, np.concatenate([np.asarray(s.images) for s in ds.splits.values()])


# ------------------------------------------------------------------------------------------ the real sample


@pytest.mark.skipif(not HAVE_SAMPLE, reason="no CelebA sample in ../shared")
def test_real_celeba_equals_centercrop_148_then_bilinear_resize(tmp_path):
    ds = load(SAMPLE, tmp_path, limit=40)
    names, images = all_images(ds)
    assert len(names) == 40
    for name, img in zip(names, images):
        np.testing.assert_array_equal(img, torchvision_way(SAMPLE / name), err_msg=name)
    assert ds.cache_path.name.endswith("-bilinear.u8")
    # Images from across the sample (other identities, the valid split) through the decoder the cache uses,
    # at 64 and at another size: to the grey level, and not what Lanczos gives.
    listing = data.scan_celeba(SAMPLE)
    spread = listing.names[:: max(1, len(listing.names) // 12)][:12]
    lanczos_differs = 0
    for name in spread:
        for size in (64, 32):
            got = data.decode_image(SAMPLE / name, size)
            np.testing.assert_array_equal(got, torchvision_way(SAMPLE / name, size), err_msg=f"{name} at {size}")
            lanczos = torchvision_way(SAMPLE / name, size, Image.Resampling.LANCZOS)
            lanczos_differs += int(np.abs(got.astype(int) - lanczos).max() > 1)
    assert lanczos_differs == 2 * len(spread)  # so the comparison above can tell the filters apart


# ------------------------------------------------------------------------------------------ the cache


def test_changing_the_filter_rebuilds_the_cache_and_never_reads_the_old_one(tmp_path):
    names = write_faces(tmp_path / "faces", 12)
    cache = tmp_path / "cache"
    bilinear = np.stack([torchvision_way(tmp_path / "faces" / n) for n in names])
    lanczos = np.stack([torchvision_way(tmp_path / "faces" / n, 64, Image.Resampling.LANCZOS) for n in names])
    assert np.abs(bilinear.astype(int) - lanczos).max() > 10  # the fixture tells the filters apart

    first = load(tmp_path / "faces", cache)
    assert first.cache_built and all_images(first)[0] == names
    np.testing.assert_array_equal(all_images(first)[1], bilinear)
    assert not load(tmp_path / "faces", cache).cache_built  # same filter: the cache is read

    other = load(tmp_path / "faces", cache, resample="lanczos")
    assert other.cache_built and other.cache_path != first.cache_path
    np.testing.assert_array_equal(all_images(other)[1], lanczos)
    meta = json.loads(other.cache_path.with_suffix(".json").read_text())
    assert meta["resample"] == "lanczos"

    again = load(tmp_path / "faces", cache)  # back to bilinear: its own cache, still valid
    assert not again.cache_built
    np.testing.assert_array_equal(all_images(again)[1], bilinear)

    # A Lanczos cache found where the bilinear one belongs (a cache from before the filter was in the file
    # name has a name of its own, but nothing but the key must be trusted) is rebuilt, never read.
    for suffix in (".u8", ".json"):
        shutil.copyfile(other.cache_path.with_suffix(suffix), first.cache_path.with_suffix(suffix))
    rebuilt = load(tmp_path / "faces", cache)
    assert rebuilt.cache_built
    np.testing.assert_array_equal(all_images(rebuilt)[1], bilinear)


def test_cache_key_names_the_filter(tmp_path):
    write_faces(tmp_path / "faces", 3)
    listing = data.scan_celeba(tmp_path / "faces")
    order = np.arange(3)
    keys = {r: data._cache_key(listing, order, 64, False, r) for r in data.RESAMPLE_FILTERS}
    assert len(set(keys.values())) == len(data.RESAMPLE_FILTERS)


def test_an_unknown_filter_is_a_clear_error_before_any_work(tmp_path, capsys):
    write_faces(tmp_path / "faces", 3)
    with pytest.raises(DataError, match="unknown resample filter 'cubic'; choose one of bilinear, bicubic"):
        load(tmp_path / "faces", tmp_path / "cache", resample="cubic")
    assert not (tmp_path / "cache").exists()
    with pytest.raises(train.ConfigError, match="unknown resample filter 'cubic'"):
        train.TrainConfig(resample="cubic").resolved()
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["--resample", "cubic"])
    assert e.value.code == 2 and "--resample" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the option


def test_cli_option_reaches_the_config():
    parse = cli.build_parser().parse_args
    assert cli.config_from_args(parse([])).resample == "bilinear"
    assert cli.config_from_args(parse(["--resample", "lanczos"])).resample == "lanczos"


def test_resuming_with_another_filter_is_refused(tmp_path, capsys):
    write_faces(tmp_path / "faces", 24)
    args = ["--data", str(tmp_path / "faces"), "--cache-dir", str(tmp_path / "cache"), "--preset", "tiny",
            "--image-size", "16", "--batch-size", "4", "--max-steps", "1", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert cli.main(args + ["--resample", "lanczos"]) == 0
    stored = train.load_checkpoint(tmp_path / "run" / train.CHECKPOINT)["meta"]["train_config"]
    assert stored["resample"] == "lanczos"
    assert cli.main(args + ["--resume", "--max-steps", "2"]) == 2  # the default is bilinear
    assert "resample: 'lanczos' (checkpoint) vs 'bilinear' (now)" in capsys.readouterr().err
    assert cli.main(args + ["--resume", "--max-steps", "2", "--resample", "lanczos"]) == 0


def test_checkpoints_from_before_the_option_count_as_lanczos():
    celeba = vars(train.TrainConfig(data=str(ROOT), preset="tiny", image_size=16).resolved())
    old = {k: v for k, v in celeba.items() if k != "resample"}
    assert [d.split(":")[0] for d in train.config_differences(old, celeba)] == ["resample"]
    assert train.config_differences(old, dict(celeba, resample="lanczos")) == []
    synthetic = vars(train.TrainConfig(preset="tiny", image_size=16).resolved())
    old = {k: v for k, v in synthetic.items() if k != "resample"}
    assert train.config_differences(old, dict(synthetic, resample="box")) == []  # no filter touches them


def test_the_built_in_faces_do_not_depend_on_the_filter():
    """They are drawn at their size, so the no-argument run's numbers cannot move with --resample."""
    configs = [train.TrainConfig(limit=16, resample=r).resolved() for r in ("bilinear", "lanczos", "nearest")]
    sets = [train.load_data(c) for c in configs]
    for ds in sets[1:]:
        for split in ("train", "valid", "test"):
            np.testing.assert_array_equal(ds.splits[split].images, sets[0].splits[split].images)
