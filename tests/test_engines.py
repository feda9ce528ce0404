"""Training on either engine through the CLI: the reference engine trains as the fast one does (the same losses to
rounding), a run may switch engine on resume, and a checkpoint of one engine loads in the other."""
import csv
from pathlib import Path

import pytest

from scratchvae import backend
from scratchvae.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
from cli_module import cli  # noqa: E402

TINY = ["--preset", "tiny", "--image-size", "16", "--limit", "48", "--batch-size", "8", "--lr", "3e-3",
        "--device", "cpu", "--no-progress", "--epochs", "2"]


def losses(out):
    with open(out / "log.csv", newline="") as f:
        return [(int(r["step"]), float(r["loss"]), float(r["recon"]), float(r["kl"])) for r in csv.DictReader(f)]


def assert_close(a, b, rel):
    assert [r[0] for r in a] == [r[0] for r in b]
    for ra, rb in zip(a, b):
        assert ra[1:] == pytest.approx(rb[1:], rel=rel), f"step {ra[0]}"


def test_the_reference_engine_trains_to_the_fast_engines_losses(tmp_path):
    """12 updates in float32 on each engine: the same losses, step by step, to float32 rounding carried along."""
    for engine in ("fast", "reference"):
        assert cli.main(TINY + ["--engine", engine, "--out", str(tmp_path / engine)]) == 0
    fast, reference = losses(tmp_path / "fast"), losses(tmp_path / "reference")
    assert len(fast) == 12
    assert_close(reference, fast, rel=1e-4)
    assert fast[-1][2] < fast[0][2]  # and it learns: the reconstruction term falls


def test_a_run_may_switch_engine_on_resume(tmp_path):
    """Stopped after 5 updates on the reference engine and resumed on the fast one: the log matches a run that
    never stopped, to rounding, and the checkpoint loads in both engines."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli.main(TINY + ["--out", str(whole)]) == 0
    assert cli.main(TINY + ["--engine", "reference", "--max-steps", "5", "--out", str(split)]) == 0
    assert cli.main(TINY + ["--engine", "fast", "--resume", "--out", str(split)]) == 0
    assert_close(losses(split), losses(whole), rel=1e-4)
    fast, reference = (VAE.load(split / "checkpoint.npz", engine=engine) for engine in ("fast", "reference"))
    assert (fast.engine, reference.engine) == ("fast", "reference")
    for name, value in reference.state_dict().items():
        assert (backend.to_host(fast.state_dict()[name]) == backend.to_host(value)).all(), name


def test_an_unknown_engine_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(TINY + ["--engine", "turbo", "--out", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert "invalid choice: 'turbo'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_the_health_check_sees_a_nan_in_any_array_a_step_changes(engine):
    """``train.non_finite_state`` sums ``state_arrays`` of the model and the optimiser (two flat arrays each on the
    fast engine): a NaN planted in any parameter, BatchNorm statistic or Adam moment is found and named."""
    import numpy  # noqa: PLC0415

    from scratchvae.train import non_finite_state  # noqa: PLC0415

    model = VAE(image_size=8, preset="tiny", engine=engine)
    optimizer = model.make_optimizer()
    model.train_step(numpy.random.default_rng(0).random((4, 3, 8, 8)).astype(numpy.float32), optimizer)
    assert non_finite_state(model, optimizer) == []
    places = [(name, p) for name, p, _ in model.named_parameters()] + list(model.named_buffers())
    places += [(f"optimiser {key}", a) for key, a in optimizer.state_dict().items() if hasattr(a, "shape")]
    assert len(places) > 3 * len(list(model.named_parameters()))  # parameters, both moments of each, buffers
    for name, array in places:
        saved = array.flat[0]
        array.flat[0] = numpy.nan
        assert name in non_finite_state(model, optimizer), name
        array.flat[0] = saved
    assert non_finite_state(model, optimizer) == []


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_trained_model_copies_and_pickles_and_trains_on_alike(engine, how):
    """After training steps (work arrays and recycled outputs made), a copy or an unpickled model keeps its engine,
    and the next step gives it the same numbers as the original."""
    import copy  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    import numpy  # noqa: PLC0415

    model = VAE(image_size=8, preset="tiny", engine=engine)
    optimizer = model.make_optimizer()
    x = numpy.random.default_rng(0).random((4, 3, 8, 8)).astype(numpy.float32)
    for step in range(2):
        model.train_step(x, optimizer, rng=backend.rng((0, step)))
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert type(clone) is type(model) and clone.engine == engine
    clone_optimizer = clone.make_optimizer()
    clone_optimizer.load_state_dict(optimizer.state_dict())
    logs = [m.train_step(x, o, rng=backend.rng((0, 2))) for m, o in ((model, optimizer), (clone, clone_optimizer))]
    assert logs[0] == logs[1]
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(clone.state_dict().items())):
        assert (backend.to_host(a) == backend.to_host(b)).all(), name


def test_a_subclass_refuses_the_other_engine():
    from scratchvae.fast import FastVAE  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"FastVAE is the fast engine's VAE.*VAE\(engine='reference'\)"):
        FastVAE(image_size=8, preset="tiny", engine="reference")
    assert type(FastVAE.from_config(VAE(image_size=8, preset="tiny").config, engine="reference")) is VAE
