"""Runs that survive (lowshot.resume): what an existing run directory means, the loader continuing inside
an epoch, and real `accelerate launch` runs killed (SIGKILL, SIGTERM; 1 and 2 CPU processes) in the middle
of an epoch and continued with resume=auto, ending bit-identical to a run never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_S

from lowshot.augment import DeviceLoader, simclr_spec
from lowshot.config import AugConfig, ConfigError, parse_args, to_yaml
from lowshot.resume import plan, saved_states

REPO = Path(__file__).resolve().parents[1]


# ---- what an existing run directory means ---------------------------------------------------------------
def _run_dir(tmp: Path, *args: str, states: tuple[str, ...] = (), finished: bool = False) -> Path:
    cfg, _ = parse_args([f"out_dir={tmp}", "name=r", *args])
    d = tmp / "r"
    d.mkdir()
    (d / "config.yaml").write_text(to_yaml(cfg))
    for s in states:
        (d / "state" / s).mkdir(parents=True)
        (d / "state" / s / "progress_0.pt").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps({"status": "finished" if finished else "running"}))
    if finished:
        (d / "results.json").write_text("{}")
    return d


def test_a_finished_run_is_never_overwritten_unless_asked(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, finished=True)
    for extra in ([], ["resume=auto"]):
        with pytest.raises(ConfigError, match=r"holds a finished run.*overwrite=true"):
            plan(parse_args([f"out_dir={tmp_path}", "name=r", *extra])[0])
    p = plan(parse_args([f"out_dir={tmp_path}", "name=r", "overwrite=true"])[0])
    assert p.dir == d and p.wipe and p.state is None
    (d / "meta.json").write_text(json.dumps({"status": "running"}))  # killed while drawing its figures
    assert "saved no state" in plan(parse_args([f"out_dir={tmp_path}", "name=r", "resume=auto"])[0]).note
    (d / "meta.json").unlink()  # a run from before meta.json's status: results.json says finished
    with pytest.raises(ConfigError, match="holds a finished run"):
        plan(parse_args([f"out_dir={tmp_path}", "name=r"])[0])


def test_a_failed_run_is_started_again_by_a_rerun(tmp_path: Path) -> None:
    """A run an error ended says so in meta.json (tracking.Run); the same command again starts it afresh,
    where an unfinished (killed) run is refused without resume= (issue 41)."""
    d = _run_dir(tmp_path, states=("step-00000004",))
    meta = {"status": "failed", "failure": "DivergenceError: fine-tuning epoch 1/3: training diverged"}
    (d / "meta.json").write_text(json.dumps(meta))
    p = plan(parse_args([f"out_dir={tmp_path}", "name=r"])[0])
    assert p.dir == d and p.wipe and p.state is None and "training diverged" in p.note
    p = plan(parse_args([f"out_dir={tmp_path}", "name=r", "resume=auto"])[0])  # or continue from its state
    assert p.state is not None and p.state.name == "step-00000004" and not p.wipe


def test_an_unfinished_run_is_continued_from_its_newest_complete_state(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "ssl.lr=0.1", states=("step-00000004", "step-00000008"))
    (d / "state" / ".tmp-step-00000012").mkdir()  # a save killed half-way: not a state
    (d / "state" / "step-00000016").mkdir()  # no progress file: not complete
    assert [s.name for s in saved_states(d)] == ["step-00000004", "step-00000008"]
    with pytest.raises(
        ConfigError, match=r"unfinished run \(its newest state is step-00000008\).*resume=auto"
    ):
        plan(parse_args([f"out_dir={tmp_path}", "name=r", "ssl.lr=0.1"])[0])
    p = plan(
        parse_args([f"out_dir={tmp_path}", "name=r", "ssl.lr=0.1", "resume=auto", "data.num_workers=3"])[0]
    )
    assert p.state == d / "state" / "step-00000008" and not p.wipe
    assert plan(parse_args(["ssl.lr=0.1", f"resume={d}"])[0]).state == p.state  # by path, no name needed


def test_a_run_is_not_continued_with_other_settings(tmp_path: Path) -> None:
    d = _run_dir(tmp_path, "ssl.lr=0.1", states=("step-00000004",))
    with pytest.raises(ConfigError, match=r"other settings \(ssl\.lr: 0\.1 → 0\.2\)"):
        plan(parse_args([f"out_dir={tmp_path}", "name=r", "ssl.lr=0.2", "resume=auto"])[0])
    with pytest.raises(ConfigError, match="not a lowshot run directory"):
        plan(parse_args([f"resume={d / 'state'}"])[0])
    with pytest.raises(ConfigError, match="resume=auto continues the run in out_dir/name: give name="):
        plan(parse_args(["resume=auto"])[0])


def test_resume_auto_starts_a_new_or_stateless_run(tmp_path: Path) -> None:
    fresh = plan(parse_args([f"out_dir={tmp_path}", "name=new", "resume=auto"])[0])
    assert fresh.dir == tmp_path / "new" and fresh.state is None and not fresh.wipe
    d = _run_dir(tmp_path)  # killed before its first state
    p = plan(parse_args([f"out_dir={tmp_path}", "name=r", "resume=auto"])[0])
    assert p.dir == d and p.wipe and p.state is None and "saved no state" in p.note


def test_the_device_loader_continues_inside_an_epoch_with_the_same_batches(data_root: Path) -> None:
    """Stopped after 2 of an epoch's 4 batches, a new loader given the epoch, the start and the
    generator's state yields exactly the batches the uninterrupted one yields next (views included)."""
    images = torch.from_numpy(np.load(data_root / "breastmnist.npz")["train_images"][:64])
    images = images[..., None] if images.ndim == 3 else images
    labels = torch.arange(64) % 2
    spec = simclr_spec(AugConfig(), 28, grayscale=True, norm={"mean": [0.5], "std": [0.25]})

    def loader() -> DeviceLoader:
        return DeviceLoader(
            images, labels, spec, 16, torch.device("cpu"), torch.Generator().manual_seed(5), 7
        )

    ref = loader()
    list(ref)  # epoch 0
    whole = list(ref)  # epoch 1
    stopped = loader()
    list(stopped)
    it = iter(stopped)
    head = [next(it), next(it)]
    state = stopped.generator.get_state()
    again = loader()
    again.epoch, again.start = 1, 2
    again.generator.set_state(state)
    tail = list(again)
    assert len(tail) == 2
    for (a, ya), (b, yb) in zip(whole, head + tail, strict=True):
        assert torch.equal(ya, yb) and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert len(list(again)) == 4  # the next pass is a whole epoch again


# ---- real runs killed and continued ---------------------------------------------------------------------
BASE = [
    "--config", "configs/smoke.yaml", "data.source=breastmnist.npz", "--warn-only", "model.name=resnet18",
    "data.size=28", "data.limit=256", "eval.bootstrap=50", "state.every_steps=3",
]  # fmt: skip


def _start(script: str, args: list[str], procs: int, tmp: Path) -> subprocess.Popen:
    flags = ["--multi_gpu", "--num_processes", "2"] if procs > 1 else ["--cpu", "--num_processes", "1"]
    env = {**os.environ, "HF_HOME": str(tmp / "hf"), "PYTHONUNBUFFERED": "1"}
    if procs > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, script, *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=HANG_S)
    assert p.returncode == 0, out[-4000:]
    return out


def _stop_at(p: subprocess.Popen, run: Path, state: str, sig: int) -> str:
    """Send ``sig`` to every process of the run as soon as ``state`` exists (inside an epoch)."""
    for _ in range(3000):
        if (run / "state" / state).is_dir() or p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before it could be stopped"
    os.killpg(p.pid, sig)
    if sig == signal.SIGKILL:  # torchrun's workers run in their own session: they are killed by name too
        subprocess.run(["pkill", "-KILL", "-f", f"name={run.name}( |$)"], check=False)
    out, _ = p.communicate(timeout=HANG_S)
    while subprocess.run(["pgrep", "-f", f"name={run.name}( |$)"], capture_output=True).returncode == 0:
        time.sleep(0.1)
    return out


def _same(a: Path, b: Path) -> None:
    def lines(run: Path) -> list[dict]:
        timing = ("pairs_per_s", "data_time_frac")
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert lines(a) == lines(b)  # every epoch once, the same numbers to the last bit
    assert (a / "checkpoint" / "backbone.safetensors").read_bytes() == (
        b / "checkpoint" / "backbone.safetensors"
    ).read_bytes()
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    for key in ("final_loss", "knn/val_accuracy", "test", "test_at_point", "selected"):
        assert ra.get(key) == rb.get(key), key
    assert not (b / "state").exists()  # a finished run keeps no states


@pytest.mark.slow
def test_sigkill_inside_an_epoch_then_resume_auto_is_bit_identical(data_root: Path, tmp_path: Path) -> None:
    """SimCLR pretraining (batched views) killed with SIGKILL inside its second epoch; the same command with
    resume=auto ends with the same metrics, kNN and weights as a run never killed, in the same W&B run."""
    args = [*BASE, f"data.root={data_root}", f"out_dir={tmp_path}", "ssl.epochs=3", "ssl.batch_size=32"]
    args += ["track.log_with=wandb", "track.wandb_mode=offline"]
    _finish(_start("ssl/pretrain.py", [*args, "name=ref"], 1, tmp_path))
    run = tmp_path / "cut"
    _stop_at(
        _start("ssl/pretrain.py", [*args, "name=cut"], 1, tmp_path), run, "step-00000009", signal.SIGKILL
    )
    assert (
        not (run / "results.json").exists()
        and json.loads((run / "meta.json").read_text())["status"] == "running"
    )
    again = _start("ssl/pretrain.py", [*args, "name=cut"], 1, tmp_path)
    out, _ = again.communicate(timeout=HANG_S)
    assert (
        again.returncode != 0 and "unfinished run" in out and "resume=auto" in out
    )  # never silently restarted
    out = _finish(_start("ssl/pretrain.py", [*args, "name=cut", "resume=auto"], 1, tmp_path))
    assert "resumed from" in out, out[-2000:]
    _same(tmp_path / "ref", run)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["resumed"][0]["from"].startswith("step-")
    # W&B cannot continue an offline run: the continuation's folder holds the whole history (same id), the
    # stopped one's is set aside, so `wandb sync wandb/offline-run-*` sends one complete run.
    (current,), (old,) = (
        list((run / "wandb").glob(g)) for g in ("offline-run-*", "superseded-offline-run-*")
    )
    assert current.name.endswith(meta["wandb"]["id"]) and old.name.endswith(meta["wandb"]["id"])
    n_new, n_old = (
        next(d.glob("run-*.wandb")).read_bytes().count(b"knn/val_accuracy") for d in (current, old)
    )
    assert (
        n_new >= 3 > n_old
    )  # every epoch's kNN in the continued run's file (3 epochs, the first 1-2 replayed)


@pytest.mark.slow
def test_sigterm_saves_a_state_and_exits_with_the_command_that_continues(
    data_root: Path, tmp_path: Path
) -> None:
    """A fine-tune on the per-image path with EMA and mixup (dropout, numpy and DataLoader draws) stopped by
    SIGTERM (a preemption): a state after the current step, exit status 143, the command to continue; the
    continued run matches one never stopped, early stopping, selection and the test split included."""
    args = [*BASE, f"data.root={data_root}", f"out_dir={tmp_path}", "train.epochs=3", "train.batch_size=32"]
    args += ["train.ema=0.9", "train.mixup=0.2", "data.augment_path=per_image", "track.log_with=none"]
    _finish(_start("finetune/train.py", [*args, "name=ref"], 1, tmp_path))
    run = tmp_path / "pre"
    out = _stop_at(
        _start("finetune/train.py", [*args, "name=pre"], 1, tmp_path), run, "step-00000006", signal.SIGTERM
    )
    assert "SIGTERM: saving a state after this step" in out and f"resume={run}" in out, out[-2000:]
    assert json.loads((run / "meta.json").read_text())["status"] == "stopped" and saved_states(run)
    assert "lockbox" not in json.loads((run / "meta.json").read_text())  # the test split was never opened
    _finish(_start("finetune/train.py", [*args, "name=pre", f"resume={run}"], 1, tmp_path))
    _same(tmp_path / "ref", run)


@pytest.mark.slow
def test_two_cpu_processes_killed_and_continued_are_bit_identical(data_root: Path, tmp_path: Path) -> None:
    """2 CPU processes (each its own augmentation generator and RNG, one shared state folder)."""
    args = [*BASE, f"data.root={data_root}", f"out_dir={tmp_path}", "ssl.epochs=3", "ssl.batch_size=32"]
    args += ["track.log_with=none", "data.limit=0"]  # 546 training images: 8 steps an epoch per process
    _finish(_start("ssl/pretrain.py", [*args, "name=ref"], 2, tmp_path))
    run = tmp_path / "cut"
    _stop_at(
        _start("ssl/pretrain.py", [*args, "name=cut"], 2, tmp_path), run, "step-00000012", signal.SIGKILL
    )
    assert {p.name for p in saved_states(run)[-1].iterdir()} >= {"progress_0.pt", "progress_1.pt"}
    one = _start("ssl/pretrain.py", [*args, "name=cut", "resume=auto"], 1, tmp_path)
    out, _ = one.communicate(timeout=HANG_S)
    assert one.returncode != 0 and "was saved by 2 process(es); continue it with 2, not 1" in out, out[-2000:]
    _finish(_start("ssl/pretrain.py", [*args, "name=cut", "resume=auto"], 2, tmp_path))
    _same(tmp_path / "ref", run)


def test_predictions_are_saved_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """predictions.npz (what report, compare and ensemble read) goes through a temporary file and a
    rename: a save that dies half-way leaves the previous file readable, and a finished one leaves no
    temporary behind."""
    from lowshot.data.cache import save_npz_atomic

    path = tmp_path / "run" / "predictions.npz"
    save_npz_atomic(path, val_prob=np.ones((3, 2)), val_y=np.arange(3))
    real = np.savez_compressed

    def dies_half_way(file: str | Path, *args: object, **kwargs: object) -> None:
        Path(file).write_bytes(b"PK\x03\x04 half a zip")  # what a kill mid-write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_npz_atomic(path, val_prob=np.zeros((3, 2)), val_y=np.arange(3))
    with np.load(path) as z:
        assert np.array_equal(z["val_prob"], np.ones((3, 2)))
    monkeypatch.setattr(np, "savez_compressed", real)
    for leftover in tmp_path.glob("run/.*.tmp.npz"):
        leftover.unlink()  # the killed writer's temporary: hidden, never read
    save_npz_atomic(path, val_prob=np.zeros((3, 2)), val_y=np.arange(3))
    with np.load(path) as z:
        assert np.array_equal(z["val_prob"], np.zeros((3, 2)))
    assert sorted(p.name for p in path.parent.iterdir()) == ["predictions.npz"]
