"""Several processes: 2 CPU processes (accelerate's gloo group) train the patch one process trains and make the
report one process makes.

The processes are spawned from the test (forked ones hang when the test process's OpenMP pool runs); each
sets the variables ``accelerate launch`` sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...) and builds
``accelerate``'s state afresh, so the code under test sees exactly a launched run. One more test launches the
``forgetpatch erase`` command itself with ``accelerate launch`` (two fresh interpreters: ~40 s more on 2 cores);
it runs with ``FORGETPATCH_LAUNCH_TEST=1``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forgetpatch import distributed

WORLD = 2
#: ESD at tiny size; a batch of 2 samples per step, so each of 2 processes trains one.
ESD = dict(iterations=2, lr=1e-3, num_inference_steps=3, latent_size=8, rank=2, progress=False, batch_size=2)
#: Dynamic Mask at tiny size, two concepts (distillation acting on the second) and a preserved word; a batch of 2
#: samples per step and 4 images per prompt, so each of 2 processes trains one sample and generates 2 images.
DYNAMIC_MASK = dict(steps=4, epochs=2, warmup=2, update_every=2, batch=2, images=4, num_inference_steps=2, lr=1e-3,
                    latent_size=8, preserve=["square"], progress=False)  # fmt: skip
#: The toy-world evaluation, very few images (10 main prompts and 1 paraphrase: batches of 4, 4 and 3), few steps.
EVAL = dict(images_per_concept=1, num_inference_steps=3, batch_size=4, progress=False, geometry=False)
#: Float summation order differs between 1 and 2 processes (the all-reduce); nothing else may.
ATOL = 1e-6


def _trajectory(engine: Any, it: int) -> torch.Tensor:
    """A loss on trajectories continued across iterations (``reuse=True``): the per-sample caches."""
    c, u = engine.encode("circle"), engine.encode("")
    x, t = engine.sample_xt("circle", c, u, 1 + it % 3, generator=engine.generator(it))
    return F.mse_loss(engine.student(x, t, c), engine.teacher(x, t, u))


def _work(checkpoints: Path) -> dict[str, Any]:
    """What each process (and the single-process reference) computes."""
    import forgetpatch
    from forgetpatch import Concept
    from forgetpatch.errors import MethodError
    from forgetpatch.eval import evaluate
    from forgetpatch.methods.finetune import FinetuneConfig, FinetuneEngine
    from forgetpatch.testing import tiny_sd_pipeline

    patch = forgetpatch.erase(tiny_sd_pipeline(0), "circle", method="esd", **ESD)
    shapes = [Concept("circle", superclass="shape"), Concept("star", superclass="shape")]
    masked = forgetpatch.erase(tiny_sd_pipeline(0), shapes, method="dynamic_mask", **DYNAMIC_MASK)
    try:
        forgetpatch.erase(tiny_sd_pipeline(0), shapes, method="dynamic_mask", **(DYNAMIC_MASK | {"batch": 1}))
        too_small = None
    except MethodError as exc:
        too_small = str(exc)
    cfg = FinetuneConfig(iterations=3, lr=1e-3, num_inference_steps=4, latent_size=8, rank=2, progress=False,
                         batch_size=3, checkpoint_dir=str(checkpoints), checkpoint_every=2)
    with FinetuneEngine(tiny_sd_pipeline(0), cfg) as engine:
        engine.train(_trajectory)
        reuse, _ = engine.factors()
        reuse_passes = engine.total_passes().as_dict()
    report = evaluate(forgetpatch.toy.pipeline(), ["circle"], **EVAL)
    summary = report.to_dict()
    summary.pop("seconds", None)
    return {
        "rank": distributed.rank(),
        "world": distributed.world_size(),
        "factors": {k: (a.clone(), b.clone()) for k, (a, b) in _factors(patch).items()},
        "training": patch.manifest.metrics["training"],
        "masked": {k: b @ a for k, (a, b) in _factors(masked).items()},
        "masked_record": masked.manifest.metrics["dynamic_mask"],
        "too_small": too_small,
        "reuse": reuse,
        "reuse_passes": reuse_passes,
        "checkpoint": torch.load(checkpoints / "engine_state.pt", weights_only=False)["passes"]
        if distributed.is_main()
        else None,
        "images": report.images,
        "judged": report.judged,
        "report": summary,
    }


def _factors(patch: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of a patch, read from its LoRA tensors."""
    tensors = patch.state_dict
    out = {}
    for key in sorted(tensors):
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            out[module] = (tensors[key], tensors[key.replace(".lora_A.", ".lora_B.")])
    assert out, f"no LoRA factors among {sorted(tensors)[:4]}"
    return out


def _process(index: int, port: int, folder: Path) -> None:
    """One launched process: the environment ``accelerate launch`` gives it, a fresh accelerate state, the work."""
    os.environ.update(
        RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # a fresh state, whatever was imported before
    GradientState._reset_state()
    try:
        torch.save(_work(folder / "checkpoints"), folder / f"rank{index}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(folder: Path, timeout: float = 240.0) -> list[dict[str, Any]]:
    """Run :func:`_process` on ``WORLD`` fresh (spawned) processes; their results, by rank. Not forked: a child
    forked from a process whose OpenMP pool is running (2 threads, as on CI) hangs in its first parallel op."""
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _process, args=(_free_port(), folder), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{WORLD} processes did not finish in {timeout:.0f} s")
    return [torch.load(folder / f"rank{i}.pt", weights_only=False) for i in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """The single-process results, the 2-process ones (by rank) and the seconds each took; under ``pytest -n N``
    made by one worker for all (``toy_bars.made_once``), since the module's tests may land on either."""
    from toy_bars import made_once

    assert not distributed.launched(), "run this test file without a launcher"

    def make() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
        folder = tmp_path_factory.mktemp("multiprocess")
        start = time.perf_counter()
        single = _work(folder / "single")
        one = time.perf_counter() - start
        start = time.perf_counter()
        several = _launch(folder)
        two = time.perf_counter() - start
        print(f"1 process {one:.1f} s, {WORLD} processes {two:.1f} s")
        return single, several, {"one": one, "two": two}

    return made_once("multiprocess-runs", make)


@pytest.mark.slow(seconds=60)  # its fixture runs two launches
def test_processes_see_a_launch(runs):
    single, several, _ = runs
    assert (single["rank"], single["world"]) == (0, 1)
    assert [(r["rank"], r["world"]) for r in several] == [(i, WORLD) for i in range(WORLD)]


def test_two_process_patch_equals_the_one_process_patch(runs):
    """ESD with batch 2: each process trains one sample, the summed gradient is the 1-process one."""
    single, several, _ = runs
    for other in several:
        assert other["factors"].keys() == single["factors"].keys()
        worst = max(
            float((x - y).abs().max())
            for k in single["factors"]
            for x, y in zip(single["factors"][k], other["factors"][k], strict=True)
        )
        assert worst <= ATOL, f"rank {other['rank']}: factors differ by up to {worst:.2e}"
        assert other["factors"]["unet.conv_in"][1].abs().max() > 1e-4  # it trained: the test is not vacuous
        assert np.allclose(other["training"]["loss_curve"], single["training"]["loss_curve"], rtol=1e-5)
        assert other["training"]["unet_passes"] == single["training"]["unet_passes"]  # summed over processes
    for k in single["factors"]:  # every process holds the same patch, bit for bit
        assert all(torch.equal(x, y) for x, y in zip(several[0]["factors"][k], several[1]["factors"][k], strict=True))


def test_two_process_dynamic_mask_equals_the_one_process_patch(runs):
    """Dynamic Mask's own loop: each process generates half the images and trains one sample of each batch; the
    gradient is summed before the mask scores it, so the weight change is the 1-process one up to float order: about
    1e-4 of its size, as Adam's normalised steps amplify the summation order (with the images generated whole on
    every process it is the same), hence a looser tolerance than ESD's."""
    single, several, _ = runs
    assert single["too_small"] is None  # one process: batch 1 is fine
    for other in several:
        assert other["masked"].keys() == single["masked"].keys()
        scale = max(float(d.abs().max()) for d in single["masked"].values())
        worst = max(float((other["masked"][k] - d).abs().max()) for k, d in single["masked"].items())
        assert scale > 1e-4 and worst <= 1e-3 * scale, f"rank {other['rank']}: changes differ by {worst:.2e} of {scale:.2e}"
        for concept, record in single["masked_record"].items():
            if isinstance(record, dict) and "turned_over" in record:
                theirs = other["masked_record"][concept]
                assert theirs["turned_over"] == record["turned_over"] and theirs["best_epoch"] == record["best_epoch"]
                assert np.allclose(theirs["forget_loss_by_epoch"], record["forget_loss_by_epoch"], rtol=1e-3)
                assert np.isclose(theirs["distill_loss_last"], record["distill_loss_last"], rtol=1e-3)
        assert "batch and images to at least 2" in other["too_small"]
    for k in single["masked"]:  # every process holds the same patch, bit for bit
        assert torch.equal(several[0]["masked"][k], several[1]["masked"][k])


def test_trajectory_reuse_and_checkpoints_split_exactly(runs):
    """Batch 3 on 2 processes (2 + 1 samples), trajectories continued per sample, checkpoints from process 0."""
    single, several, _ = runs
    for other in several:
        for k, (a, b) in single["reuse"].items():
            assert torch.allclose(other["reuse"][k][0], a, atol=ATOL)
            assert torch.allclose(other["reuse"][k][1], b, atol=ATOL)
        assert other["reuse_passes"] == single["reuse_passes"]
    assert several[0]["checkpoint"] == single["checkpoint"] == {
        k: v for k, v in single["reuse_passes"].items() if k != "total"
    }
    assert several[1]["checkpoint"] is None


def test_sharded_evaluation_equals_the_one_process_report(runs):
    single, several, _ = runs
    assert len(single["images"]) == 11
    for other in several:
        assert other["images"].shape == single["images"].shape
        assert np.array_equal(other["images"], single["images"])  # whole batches per process: bit-equal
        assert other["judged"] == single["judged"]
        assert other["report"] == single["report"]


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("FORGETPATCH_LAUNCH_TEST", "") in ("", "0"), reason="set FORGETPATCH_LAUNCH_TEST=1 (~40 s)"
)
def test_accelerate_launch_runs_the_erase_command(tmp_path):
    """``accelerate launch --num_processes 2 -m forgetpatch.cli erase`` on the CPU: one patch folder, written once,
    equal to the 1-process patch with the same settings."""
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    import forgetpatch
    from forgetpatch.format import read_patch

    settings = dict(iterations=2, lr=0.001, num_inference_steps=4, batch_size=2, rank=2, progress=False)
    params = [f"{k}={v}" for k, v in settings.items()]
    command = [
        "--base", "toy", "--method", "esd", "--concept", "circle", "-o", str(tmp_path / "two"),
        *[arg for p in params for arg in ("--param", p)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    if torch.cuda.is_available():
        pytest.skip("this test launches CPU processes; on a GPU machine use the README's command")
    result = subprocess.run([*launch, "-m", "forgetpatch.cli", "erase", *command], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1, result.stdout  # process 0 writes and reports, once
    two = read_patch(tmp_path / "two")
    assert two.manifest.metrics["training"]["unet_passes"]["backward"] == 4  # 2 iterations x 2 samples
    one = forgetpatch.erase(forgetpatch.toy.pipeline(), "circle", method="esd", **settings)
    a, b = _factors(one), _factors(two)
    assert a.keys() == b.keys()
    assert max(float((x - y).abs().max()) for k in a for x, y in zip(a[k], b[k], strict=True)) <= ATOL
