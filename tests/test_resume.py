"""Crash-consistent training: a run killed at any instant and started again ends with exactly the
weights, EMA weights and optimiser state of a run never stopped (tiny 16x16 runs, one thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numba
import pytest
import torch
from ignite.engine import Events

from pipeline.atomic import atomic_path, remove_orphans
from pipeline.bundle import make_workflow, run_bundle
from pipeline.model.checkpoint import EpochSampler, GlobalRNG, checkpoint_files, load_checkpoint

REPO = Path(__file__).resolve().parent.parent
STEPS = 30
"""Optimiser steps of every run here: 18 iterations per epoch, so the run ends inside its second epoch."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}

# A child process that trains, reports each iteration and can be told to pause inside one
# checkpoint write: the test kills it there with SIGKILL, or at a random moment.
DRIVER = r'''
import json, os, sys, time
import numba, torch
from ignite.engine import Events
from pipeline.bundle import make_workflow

torch.set_num_threads(1)
numba.set_num_threads(1)


class Killed(Exception):
    pass


def die(engine):
    raise Killed(engine.state.iteration)


def pause_in_save(marker, seconds):
    """Announce each torch.save; wait before writing the one whose file name holds ``marker``."""
    save = torch.save

    def announced(obj, f, *args, **kwargs):
        name = os.path.basename(str(f))
        print(f"saving {name}", flush=True)
        if marker and marker in name:
            time.sleep(seconds)
        return save(obj, f, *args, **kwargs)

    torch.save = announced


def train(workflow, settings, crash_at=0, step_pause=0.0, finalize=True):
    flow = make_workflow(workflow, **settings)
    trainer = flow.parser.get_parsed_content("train#trainer")

    def report(engine):
        print(f"iteration {engine.state.iteration}", flush=True)
        time.sleep(step_pause)

    trainer.add_event_handler(Events.ITERATION_COMPLETED, report)
    if crash_at:
        trainer.add_event_handler(Events.ITERATION_STARTED(once=crash_at), die)
    try:
        flow.run()
    except RuntimeError as err:
        if not isinstance(err.__cause__, Killed):
            raise
    if finalize:
        flow.finalize()


workflow, plan = sys.argv[1], json.loads(sys.argv[2])
pause_in_save(plan.get("pause_in", ""), plan.get("pause_s", 0.0))
for i, run in enumerate(plan["runs"]):  # runs after a crash reuse the process group: finalize only the last
    train(workflow, run["settings"], run.get("crash_at", 0), plan.get("step_pause", 0.0), i == len(plan["runs"]) - 1)
'''


def settings(dataset: Path, out: Path, shared: Path, **extra) -> dict:
    """A run of a few seconds: 16x16 FLAIR slices, a small UNet, batch 4, mid-epoch checkpoints every 5 steps.
    The random split: the checkpoint iterations below were worked out on its training slices."""
    values = dict(dataset_dir=str(dataset), output_dir=str(out), ckpt_dir=str(out / "models"),
                  split_file=str(shared / "split.json"), cache_dir=str(shared / "cache"), split_method="random",
                  image_size=16, pixdim=[4.0, 4.0, 4.0], unet_channels=[8, 8, 8], attention_levels=[False, False, False],
                  norm_num_groups=8, num_head_channels=8, modalities=["FLAIR"], prediction_type="epsilon",
                  batch_size=4, epochs=2, train_steps=STEPS, lr_warmup_steps=5, ema_decay=0.9,
                  checkpoint_every_iterations=5, progress=False, num_workers=1, seed=3)
    values.update(extra)
    return values


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run here (and in the child processes) sums in the same order: one torch and numba thread."""
    threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    numba.set_num_threads(numba_threads)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def reference(synth_root, shared, tmp_path_factory):
    """Uninterrupted runs, one per noise type, made on first use."""
    done = {}

    def get(noise: str) -> Path:
        if noise not in done:
            out = tmp_path_factory.mktemp(f"reference-{noise}")
            run_bundle("train", **settings(synth_root, out, shared, noise=noise))
            done[noise] = out
        return done[noise]

    return get


class Killed(Exception):
    pass


def _die(engine):
    raise Killed(engine.state.iteration)


def crash(run: dict, at_iteration: int) -> None:
    """Train in this process until iteration ``at_iteration`` starts, then die: only the folder survives."""
    flow = make_workflow("train", **run)
    flow.parser.get_parsed_content("train#trainer").add_event_handler(Events.ITERATION_STARTED(once=at_iteration), _die)
    with pytest.raises(RuntimeError) as info:
        flow.run()
    assert isinstance(info.value.__cause__, Killed)


def _leaves(state, prefix=""):
    """(name, value) of every tensor and number in a nested state dict."""
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _leaves(value, f"{prefix}/{key}")
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _leaves(value, f"{prefix}/{i}")
    elif isinstance(state, (torch.Tensor, int, float)) and not isinstance(state, bool):
        yield prefix, state


def max_difference(expected: Path, actual: Path) -> float:
    """Largest absolute difference between two runs: ``model.pt`` and the last checkpoint's network,
    EMA weights and optimiser state (the same names must exist on both sides)."""
    pairs = [(load_checkpoint(expected / "models" / "model.pt"), load_checkpoint(actual / "models" / "model.pt"))]
    last = [load_checkpoint(checkpoint_files(run / "models")[-1]) for run in (expected, actual)]
    pairs += [(last[0][key], last[1][key]) for key in ("network", "ema", "optimizer")]
    worst = 0.0
    for a, b in pairs:
        a, b = dict(_leaves(a)), dict(_leaves(b))
        assert a.keys() == b.keys()
        for name in a:
            x, y = torch.as_tensor(a[name], dtype=torch.float64), torch.as_tensor(b[name], dtype=torch.float64)
            assert x.shape == y.shape, name
            gap = (x - y).abs().nan_to_num(nan=float("inf"))  # a NaN on one side is no agreement
            worst = max(worst, float(gap.max()) if gap.numel() else 0.0)
    return worst


def assert_same_run(expected: Path, actual: Path, why: str = "") -> None:
    """Bit-identical weights, EMA and optimiser; the same checkpoints kept; no temp file left."""
    assert max_difference(expected, actual) == 0.0, why
    names = [[p.name for p in checkpoint_files(run / "models")] for run in (expected, actual)]
    assert names[0] == names[1], why  # rotation ends where an uninterrupted run's does: nothing left over
    leftovers = [p.name for p in (actual / "models").iterdir() if p.name.startswith((".", "tmp"))]
    assert leftovers == [], why


@pytest.mark.parametrize("noise", ["gaussian", "simplex"])
@pytest.mark.parametrize("kill_at", [8, 19, "end"])
def test_killed_run_resumes_bit_identical(synth_root, shared, reference, tmp_path, noise, kill_at):
    """Killed mid-epoch (newest checkpoint at step 5 of an 18-step epoch), just after an epoch's
    checkpoint (step 18, written after validation) or after the final checkpoint but before
    ``model.pt``: the re-run ends exactly where the uninterrupted run ended."""
    run = settings(synth_root, tmp_path, shared, noise=noise)
    if kill_at == "end":
        run_bundle("train", **run)
        (tmp_path / "models" / "model.pt").unlink()
    else:
        crash(run, kill_at)
        assert checkpoint_files(tmp_path / "models")
    run_bundle("train", **run)
    assert_same_run(reference(noise), tmp_path)


def test_rotation_survives_a_checkpoint_already_gone(synth_root, shared, reference, tmp_path):
    """A kill between a rotation's delete and the record of it: the resumed handler meets a file that
    is gone, and must carry on (ignite's own DiskSaver raises FileNotFoundError here)."""
    run = settings(synth_root, tmp_path, shared, noise="gaussian")
    crash(run, 19)
    ckpt = tmp_path / "models"
    assert [p.name for p in checkpoint_files(ckpt)] == ["checkpoint_15.pt", "checkpoint_18.pt"]
    flow = make_workflow("train", **run)
    trainer = flow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(Events.ITERATION_STARTED(once=19), lambda _: (ckpt / "checkpoint_15.pt").unlink())
    flow.run()
    flow.finalize()
    assert_same_run(reference("gaussian"), tmp_path)


def _child(plan: dict, workflow: str = "train", torchrun: bool = False) -> subprocess.Popen:
    script = Path(plan["runs"][0]["settings"]["output_dir"]).parent / "driver.py"
    script.write_text(DRIVER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.Popen([*launcher, str(script), workflow, json.dumps(plan)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})


def _kill_when(proc: subprocess.Popen, line_start: str, delay: float = 0.0) -> list[str]:
    """Read the child's output until a line starts with ``line_start``, wait ``delay``, SIGKILL it."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(line_start):
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-30:])
    return seen


def test_sigkill_inside_a_checkpoint_write(synth_root, shared, reference, tmp_path):
    """SIGKILL while step 15's checkpoint is being written, just after rotation deleted step 5's:
    the writer's temp file is orphaned, the re-run removes it, resumes from step 10 (mid-epoch)
    and ends bit-identical."""
    run = settings(synth_root, tmp_path / "run", shared, noise="simplex")
    proc = _child({"runs": [{"settings": run}], "pause_in": ".checkpoint_15.pt.", "pause_s": 30})
    _kill_when(proc, "saving .checkpoint_15.pt.")
    ckpt = tmp_path / "run" / "models"
    assert [p.name for p in checkpoint_files(ckpt)] == ["checkpoint_10.pt"]
    assert [p for p in ckpt.iterdir() if p.name.startswith(".checkpoint_15.pt.")], "no orphan temp file to clean"
    run_bundle("train", **run)
    assert_same_run(reference("simplex"), tmp_path / "run")


def test_sigkill_at_a_random_moment(synth_root, shared, reference, tmp_path):
    """SIGKILL at a random instant after the first checkpoint (inside a step, a checkpoint write,
    a rotation or validation), then one re-run: the same weights as the uninterrupted run."""
    seed = random.randrange(10**6)
    draw = random.Random(seed)
    after, delay = draw.randint(5, STEPS - 3), draw.uniform(0.0, 0.05)
    run = settings(synth_root, tmp_path / "run", shared, noise="gaussian")
    proc = _child({"runs": [{"settings": run}], "step_pause": 0.05})
    _kill_when(proc, f"iteration {after}\n", delay)
    assert checkpoint_files(tmp_path / "run" / "models"), f"seed {seed}"
    run_bundle("train", **run)
    assert_same_run(reference("gaussian"), tmp_path / "run", f"seed {seed}: killed {delay:.3f} s after step {after}")


def test_torchrun_run_resumes_bit_identical(synth_root, shared, tmp_path):
    """Two gloo processes: killed mid-epoch and resumed (each rank its own RNG state, rank 0 writes)
    equals an uninterrupted two-process run."""
    resumed = settings(synth_root, tmp_path / "resumed", shared, train_steps=12, checkpoint_every_iterations=3)
    uninterrupted = settings(synth_root, tmp_path / "uninterrupted", shared, train_steps=12, checkpoint_every_iterations=3)
    plan = {"runs": [{"settings": resumed, "crash_at": 6}, {"settings": resumed}, {"settings": uninterrupted}]}
    proc = _child(plan, "multi_gpu_train", torchrun=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output and "checkpoint_3.pt" in output
    state = load_checkpoint(checkpoint_files(tmp_path / "resumed" / "models")[-1])
    assert len(state["rng"]["ranks"]) == 2
    assert not any(k.startswith("module.") for k in state["network"])  # saved unwrapped: any run can resume it
    assert_same_run(tmp_path / "uninterrupted", tmp_path / "resumed")


def test_orphan_temps_of_dead_writers_only_are_removed(tmp_path):
    """A dead writer's temp file goes; a live writer's (this process, mid-write) and other names stay."""
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; from pipeline.atomic import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)"), str(tmp_path / "checkpoint_5.pt")],
        cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    orphan = [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint_5.pt.")]
    assert len(orphan) == 1
    (tmp_path / "tmpk2x8a1").write_bytes(b"not ours")  # ignite's naming: no writer recorded, never touched
    (tmp_path / "checkpoint_10.pt").write_bytes(b"done")
    with atomic_path(tmp_path / "checkpoint_15.pt") as live:
        live.write_bytes(b"still writing")
        assert remove_orphans(tmp_path) == orphan
        assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_10.pt", "checkpoint_15.pt", "tmpk2x8a1"]


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    """The loader's order needs no saved generator, and a resumed epoch starts at the first unused sample."""
    data = list(range(10))
    a, b = EpochSampler(data, seed=4), EpochSampler(data, seed=4)
    torch.rand(3)  # global draws change nothing
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == data
    b.set_epoch(2)
    assert list(b) != list(a)
    full = list(a)
    a.start_at(epoch=3, position=6)
    assert list(a) == full[6:] and list(a) == full[6:]  # every pass of the resumed epoch, however often iterated
    a.set_epoch(4)
    assert len(list(a)) == 10  # later epochs are whole


def test_global_rng_states_round_trip_through_a_checkpoint(tmp_path):
    """torch, numpy and Python streams continue exactly after save and a weights_only load."""
    import numpy as np

    np.random.randn(), random.gauss(0, 1)  # leave a cached Gaussian in both, to be saved too
    saved = GlobalRNG().state_dict()
    torch.save(saved, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(), random.gauss(0, 1))
    GlobalRNG().load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)], np.random.randn(), random.gauss(0, 1))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2:] == again[2:]


def test_resuming_another_runs_checkpoints_is_refused(synth_root, shared, tmp_path):
    """Checkpoints record data and settings: a run crashed on one dataset, re-run on another into the same
    folder, stops with one line (through the command line, in a child process as a user runs it) instead of
    continuing foreign weights; other settings are refused the same way; ``resume false`` starts afresh."""
    import shutil

    from pipeline.errors import InputError, find_input_error

    run = settings(synth_root, tmp_path / "run", shared)
    crash(run, 8)
    kept = checkpoint_files(tmp_path / "run" / "models")
    assert kept and load_checkpoint(kept[-1])["provenance"]["settings"]["noise"] == "gaussian"
    other_data = tmp_path / "other-data"
    shutil.copytree(synth_root, other_data)
    task = other_data / "Task01_BrainTumour"
    (task / "imagesTr" / "BRATS_001.nii.gz").unlink()  # other content
    listing = json.loads((task / "dataset.json").read_text())
    listing["training"] = [e for e in listing["training"] if "BRATS_001" not in e["image"]]
    (task / "dataset.json").write_text(json.dumps(listing))
    other = {**run, "dataset_dir": str(other_data), "split_file": str(tmp_path / "o" / "split.json"),
             "cache_dir": str(tmp_path / "o" / "cache")}
    argv = [x for k, v in other.items() for x in (f"--{k}", json.dumps(v) if isinstance(v, list) else str(v))]
    result = subprocess.run([sys.executable, "-m", "pipeline", "train", "--quiet", *argv], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, **ONE_THREAD})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-3000:]
    assert "holds checkpoints of another training run: data" in lines[0] and str(kept[-1]) in lines[0]
    with pytest.raises(Exception) as info:  # the same data, another noise type
        run_bundle("train", **{**run, "noise": "simplex"})
    found = find_input_error(info.value)
    assert isinstance(found, InputError) and "settings.noise 'gaussian' (this run: 'simplex')" in found.problem
    assert checkpoint_files(tmp_path / "run" / "models") == kept, "nothing touched"
    run_bundle("train", **{**run, "noise": "simplex", "resume": False})
    newest = load_checkpoint(checkpoint_files(tmp_path / "run" / "models")[-1])
    assert newest["provenance"]["settings"]["noise"] == "simplex"
