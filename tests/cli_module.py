"""The command line, ``examples/celeba.py``, loaded once as a module for the tests that run it in process, and the
tiny run they train with it."""
import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("celeba_cli", ROOT / "examples" / "celeba.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# 48 faces of 16x16, batches of 8: 6 steps per epoch; the whole run takes well under a second
TINY = ["--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--lr", "3e-3",
        "--device", "cpu", "--no-progress"]
PER_EPOCH = 6


def run(out, *args):
    """main() of the CLI on the tiny setup, writing into ``out``; returns the exit status."""
    return cli.main(TINY + ["--out", str(out), *map(str, args)])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def losses(out):
    """log.csv without the timing column, which no two runs share."""
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows(out / "log.csv")]
