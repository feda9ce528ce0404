"""The command line, ``examples/celeba.py``, loaded once as a module for the tests that run it in process."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("celeba_cli", ROOT / "examples" / "celeba.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)
