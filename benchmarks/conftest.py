"""The benchmark tools' tests run with the tests' stand-in device (``tests/strict_device.py``) importable."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
