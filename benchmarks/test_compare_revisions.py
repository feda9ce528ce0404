"""benchmarks/compare_revisions.py's export for a machine without git (a lent GPU machine), and its comparison with
the exported package, on the CPU."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_revisions", ROOT / "benchmarks" / "compare_revisions.py")
compare_revisions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_revisions)


def git_show(rev, path):
    return subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def test_an_exported_revision_is_compared_without_git(monkeypatch, tmp_path, capsys):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    monkeypatch.setattr(compare_revisions, "REVISIONS", str(tmp_path))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "SCRATCHVAE_THREADS"):
        monkeypatch.setenv(var, "2")  # (main sets them: restored after the test)
    monkeypatch.delitem(sys.modules, "scratchvae_rev", raising=False)

    compare_revisions.main(["HEAD", "--export"])
    exported = tmp_path / "HEAD" / "scratchvae_rev"
    assert (exported / "vae.py").read_text() == git_show("HEAD", "scratchvae/vae.py")
    with pytest.raises(SystemExit, match="exists already"):  # an export is never overwritten
        compare_revisions.main(["HEAD", "--export"])
    with pytest.raises(SystemExit, match="--export"):  # a revision not exported says how to get it
        compare_revisions.main(["0123456", "--exported"])

    capsys.readouterr()
    compare_revisions.main(["HEAD", "--exported", "--batch", "2", "--steps", "2"])
    out = capsys.readouterr().out
    assert "HEAD: median step" in out and "working tree: median step" in out and "all layers" in out
    assert sys.modules["scratchvae_rev"].__file__ == str(exported / "__init__.py")  # the export, not this tree
    sys.modules.pop("scratchvae_rev")
