"""benchmarks/bench_train.py's driver logic on made-up results, without PyTorch (CI has none): the framework
names, the three PyTorch configurations, the choice of the strongest, the ratios and peak memory it prints, and a
torch.compile that does not work here. One test runs the PyTorch worker itself, where torch is installed."""
import importlib.util
import types
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def fake(ips, batch=64, peak=500.0, rounds=(1.0,), **extra):
    """A merged result of images/s ``ips`` (each process's speed ``ips * r`` for r in ``rounds``)."""
    medians = [batch / (ips * r) for r in rounds]
    return {"step_s": sorted(medians), "round_step_s": medians, "peak_rss_mb": peak, "base_rss_mb": 100.0,
            "small_step_s": [0.01], **extra}


def args_for(*argv):
    return bench_train.parse_args(list(argv))


def test_framework_names_carry_the_device_last():
    assert bench_train.parse_framework("torch_compile-gpu") == ("torch_compile", "gpu")
    assert bench_train.parse_framework("torch_cl-cpu") == ("torch_cl", "cpu")
    assert bench_train.parse_framework("scratchvae-cpu") == ("scratchvae", "cpu")
    for bad, why in [("torch_compile", "unknown device 'torch_compile'"), ("torch-tpu", "unknown device 'tpu'"),
                     ("pytorch-cpu", "unknown kind 'pytorch'"), ("cpu-torch", "unknown device 'torch'"),
                     ("torch-cl-cpu", "unknown kind 'torch-cl'")]:  # (split at the first '-': device 'cl-cpu')
        with pytest.raises(ValueError, match=why):
            bench_train.parse_framework(bad)
    names = bench_train.build_frameworks(["cpu", "gpu"], True, ["eager", "channels_last", "compile"])
    assert names == ["scratchvae-cpu", "scratchvae-gpu", "reference-cpu", "reference-gpu", "torch-cpu", "torch-gpu",
                     "torch_cl-cpu", "torch_cl-gpu", "torch_compile-cpu", "torch_compile-gpu"]
    assert bench_train.build_frameworks(["cpu"], False, ()) == ["scratchvae-cpu"]  # without PyTorch
    # each configuration's layout and compilation as the worker reads them from the name
    assert bench_train.TORCH_KINDS[bench_train.parse_framework("torch_compile-cpu")[0]] == ("channels_last", True)
    assert bench_train.TORCH_KINDS[bench_train.parse_framework("torch_cl-gpu")[0]] == ("channels_last", False)
    assert bench_train.TORCH_KINDS[bench_train.parse_framework("torch-cpu")[0]] == ("contiguous", False)


def test_torch_configs_option(capsys):
    assert args_for().torch_configs == ["eager", "channels_last", "compile"]
    assert args_for("--torch-configs", "compile").torch_configs == ["compile"]
    assert args_for("--torch-configs", "eager", "channels_last").torch_configs == ["eager", "channels_last"]
    with pytest.raises(SystemExit) as exit_info:
        args_for("--torch-configs", "jit")
    assert exit_info.value.code == 2 and "invalid choice: 'jit'" in capsys.readouterr().err


def test_the_strongest_is_the_one_with_the_most_images_per_second():
    results = {("torch-cpu", "default", 64): fake(130), ("torch_cl-cpu", "default", 64): fake(165),
               ("torch_compile-cpu", "default", 64): fake(180), ("torch_compile-cpu", "default", 128): None,
               ("torch-cpu", "default", 128): fake(120, 128), ("torch_cl-cpu", "default", 128): fake(170, 128)}
    everyone = ["torch-cpu", "torch_cl-cpu", "torch_compile-cpu"]
    assert bench_train.strongest(results, everyone, "default", 64) == "torch_compile-cpu"
    assert bench_train.strongest(results, everyone, "default", 128) == "torch_cl-cpu"  # compile failed there
    assert bench_train.strongest(results, ["torch-cpu"], "default", 64) == "torch-cpu"
    assert bench_train.strongest(results, everyone, "small", 64) is None


def test_ratios_against_each_configuration_and_the_strongest(capsys):
    frameworks = ["scratchvae-cpu", "reference-cpu", "torch-cpu", "torch_cl-cpu", "torch_compile-cpu"]
    steady = (1.0, 1.0, 1.0)
    results = {("scratchvae-cpu", "default", 64): fake(150, rounds=(1.0, 1.2, 0.8)),
               ("reference-cpu", "default", 64): fake(30, rounds=steady),
               ("torch-cpu", "default", 64): fake(120, rounds=steady),
               ("torch_cl-cpu", "default", 64): fake(160, rounds=steady),
               ("torch_compile-cpu", "default", 64): fake(200, rounds=steady)}
    args = args_for("--presets", "default", "--batches", "64")
    pairs = bench_train.ratio_pairs(frameworks)
    assert pairs == [("scratchvae-cpu", fw) for fw in frameworks[1:]]
    bench_train.print_ratios(results, pairs, args)
    bench_train.print_strongest(results, frameworks, args)
    out = capsys.readouterr().out
    lines = out.splitlines()
    each = {fw: next(ln for ln in lines if f"/ {fw} " in ln) for fw in frameworks[1:]}
    # medians: ours 150 (processes at 150, 180, 120 img/s); theirs 120, 160, 200
    assert "default  batch   64:  1.25" in each["torch-cpu"]
    assert "default  batch   64:  0.94" in each["torch_cl-cpu"]
    assert "default  batch   64:  0.75" in each["torch_compile-cpu"]
    assert "process by process: median 0.75, 0.60-0.90, at least 1.0 in 0 of 3" in each["torch_compile-cpu"]
    assert "default  batch   64:  5.00" in each["reference-cpu"]
    strongest = lines[lines.index(next(ln for ln in lines if "STRONGEST" in ln)):]
    assert "default  batch   64:  0.75   (process by process: median 0.75" in strongest[0]
    assert "the strongest: torch_compile-cpu, 200.0 img/s" in strongest[1]
    assert "torch-cpu 120.0" in strongest[1] and "torch_cl-cpu 160.0" in strongest[1]
    assert "reference" not in "\n".join(strongest)  # the reference engine is not a PyTorch configuration


def test_the_strongest_is_chosen_per_batch_and_device(capsys):
    frameworks = ["scratchvae-cpu", "scratchvae-gpu", "torch-cpu", "torch-gpu", "torch_cl-cpu", "torch_cl-gpu"]
    results = {("scratchvae-cpu", "small", 64): fake(400), ("scratchvae-cpu", "small", 128): fake(400, 128),
               ("torch-cpu", "small", 64): fake(300), ("torch-cpu", "small", 128): fake(500, 128),
               ("torch_cl-cpu", "small", 64): fake(320), ("torch_cl-cpu", "small", 128): fake(250, 128),
               ("scratchvae-gpu", "small", 64): fake(20000), ("torch-gpu", "small", 64): fake(25000),
               ("torch_cl-gpu", "small", 64): fake(10000)}
    bench_train.print_strongest(results, frameworks, args_for("--presets", "small", "--batches", "64", "128"))
    lines = capsys.readouterr().out.splitlines()
    heads = [i for i, ln in enumerate(lines) if "STRONGEST PyTorch" in ln]
    got = {lines[i].split(" / ")[0].strip() + lines[i].split("batch")[1].split(":")[0].strip():
           (lines[i].split(":")[1].split()[0], lines[i + 1].split("strongest: ")[1].split(",")[0]) for i in heads}
    assert got == {"scratchvae-cpu64": ("1.25", "torch_cl-cpu"), "scratchvae-cpu128": ("0.80", "torch-cpu"),
                   "scratchvae-gpu64": ("0.80", "torch-gpu")}


def test_peak_memory_ours_over_theirs_and_the_smallest(capsys):
    frameworks = ["scratchvae-cpu", "scratchvae-gpu", "torch-cpu", "torch_cl-cpu", "torch_compile-cpu", "torch-gpu"]
    results = {("scratchvae-cpu", "default", 64): fake(150, peak=800),
               ("torch-cpu", "default", 64): fake(120, peak=700), ("torch_cl-cpu", "default", 64): fake(160, peak=640),
               ("torch_compile-cpu", "default", 64): fake(200, peak=1600),
               ("scratchvae-gpu", "default", 64): fake(9000, peak=2000, peak_device_mb=1350),
               ("torch-gpu", "default", 64): fake(9000, peak=3000, peak_device_mb=450)}
    bench_train.print_memory_ratios(results, frameworks, args_for("--presets", "default", "--batches", "64"))
    out = capsys.readouterr().out
    assert "torch-cpu 700 MB: 1.14" in out and "torch_cl-cpu 640 MB: 1.25" in out
    assert "torch_compile-cpu 1600 MB: 0.50" in out
    assert "against the smallest PyTorch peak (torch_cl-cpu, 640 MB): 1.25" in out
    # on a GPU the device pools are compared, not the processes' resident sets
    assert "torch-gpu 450 MB: 3.00" in out and "(torch-gpu, 450 MB): 3.00" in out


def test_a_torch_compile_that_does_not_work_is_reported_and_the_others_carry_on(capsys):
    calls = []

    def run(fw, preset, batch, args):
        calls.append(fw)
        if fw == "torch_compile-cpu":
            try:
                raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  (long traceback)")
            except RuntimeError as e:
                return {"error": bench_train.compile_failure(e, "cpu"), "compiled": True}
        return fake({"scratchvae-cpu": 150, "torch-cpu": 120, "torch_cl-cpu": 160}[fw], batch)

    frameworks = ["scratchvae-cpu", "torch-cpu", "torch_cl-cpu", "torch_compile-cpu"]
    args = args_for("--presets", "default", "small", "--batches", "64", "--rounds", "2")
    results, left_out = bench_train.run_configurations(frameworks, args, run=run)
    out = capsys.readouterr().out
    said = [ln for ln in out.splitlines() if "torch.compile does not work here" in ln]
    assert said == ["  torch_compile-cpu: torch.compile does not work here on the CPU (RuntimeError: InvalidCxxCompiler:"
                    " No working C++ compiler found); left out, the other configurations carry on"]
    assert calls.count("torch_compile-cpu") == 1  # not tried again: not in round 2, not for the next preset
    assert calls.count("torch_cl-cpu") == 4 and calls.count("scratchvae-cpu") == 4
    assert results[("torch_compile-cpu", "default", 64)] is None and results[("torch_compile-cpu", "small", 64)] is None
    assert bench_train.summarize(results[("torch_cl-cpu", "small", 64)], 64)[0] == pytest.approx(160)
    assert set(left_out) == {"torch_compile-cpu"}

    bench_train.print_throughput(results, frameworks, args)
    bench_train.print_strongest(results, frameworks, args, left_out)
    out = capsys.readouterr().out
    assert "the strongest: torch_cl-cpu, 160.0 img/s" in out
    assert "(not among them: torch_compile-cpu, torch.compile does not work here on the CPU (RuntimeError" in out


def test_compile_time_is_kept_and_shown():
    rounds = [fake(180, compile_s=4.0, warmup_s=5.0), fake(200, compile_s=31.0, warmup_s=33.5)]
    for r in rounds:  # as a process reports itself, before merging
        r["step_s"] = [r["step_s"][0]] * 3
    merged = bench_train.merge_rounds(rounds)
    assert merged["compile_s"] == 31.0 and merged["warmup_s"] == 33.5  # the slowest process's
    line = bench_train.process_line("torch_compile-cpu", "default", 64, rounds[0])
    assert "180.0 img/s" in line and "compile + warm-up 5.0 s of which the first step 4.0 s" in line
    assert "compile" not in bench_train.process_line("torch-cpu", "default", 64, fake(120))


def test_the_per_layer_column_runs_the_stronger_eager_layout():
    results = {("torch-cpu", "small", 64): fake(300), ("torch_cl-cpu", "small", 64): fake(340),
               ("torch_compile-cpu", "small", 64): fake(400), ("torch-gpu", "small", 64): fake(9000),
               ("torch_cl-gpu", "small", 64): fake(8000)}
    every = ["scratchvae-cpu", "scratchvae-gpu", "torch-cpu", "torch-gpu", "torch_cl-cpu", "torch_cl-gpu",
             "torch_compile-cpu"]
    assert bench_train.layer_framework(results, every, "cpu", "small") == "torch_cl-cpu"  # not the compiled one
    assert bench_train.layer_framework(results, every, "gpu", "small") == "torch-gpu"
    assert bench_train.layer_framework({}, every, "cpu", "small") == "torch_cl-cpu"  # batch 64 was not timed
    assert bench_train.layer_framework(results, ["scratchvae-cpu", "torch_compile-cpu"], "cpu", "small") == \
        "torch_cl-cpu"  # compile alone: its layout, eager
    assert bench_train.layer_framework(results, ["scratchvae-cpu", "torch-cpu"], "cpu", "small") == "torch-cpu"
    assert bench_train.layer_framework(results, ["scratchvae-cpu"], "cpu", "small") is None


def test_the_torch_worker_reports_a_failing_compile(monkeypatch):
    torch = pytest.importorskip("torch")

    def broken_compile(fn, **options):
        def run(*a):
            raise RuntimeError("backend 'inductor' failed: no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(bench_train, "PRESETS", {"tiny": ((4, 8), 4)})
    args = types.SimpleNamespace(threads=1, warmup=1, steps=1, layers=False)
    out = bench_train.torch_worker("torch_compile", "cpu", "tiny", 2, args)
    assert out == {"error": "torch.compile does not work here on the CPU (RuntimeError: backend 'inductor' failed: "
                            "no C++ compiler)", "compiled": True}
    out = bench_train.torch_worker("torch_cl", "cpu", "tiny", 2, args)  # the uncompiled ones are unaffected
    assert out["memory_format"] == "channels_last" and not out["compiled"] and len(out["step_s"]) == 1


def test_a_compiled_configuration_is_timed_after_its_compilation_and_2_more_steps(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []

    def counting_compile(fn, **options):  # stands in for torch.compile: no compiler needed, every call counted
        def run(x, eps):
            calls.append(len(x))
            assert x.is_contiguous(memory_format=torch.channels_last)  # inputs in the model's layout
            return fn(x, eps)
        return run

    monkeypatch.setattr(torch, "compile", counting_compile)
    monkeypatch.setattr(bench_train, "PRESETS", {"tiny": ((4, 8), 4)})
    args = types.SimpleNamespace(threads=1, warmup=0, steps=3, layers=False)
    out = bench_train.torch_worker("torch_compile", "cpu", "tiny", 4, args)
    # batch 4: the compiling step, 2 warm-up steps (though --warmup 0), 3 timed; the 2-image steps: their own
    # compiling step, 2 more, 3 timed
    assert calls == [4] * (1 + 2 + 3) + [2] * (1 + 2 + 3)
    assert out["compiled"] and len(out["step_s"]) == 3 and out["warmup_s"] >= out["compile_s"] > 0
