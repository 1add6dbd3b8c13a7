"""Does a run killed at a random moment, then continued with resume=auto, end exactly where an
uninterrupted run ends?

    LOWSHOT_DATA_ROOT=../shared/data python bench/fault_injection.py [--trials 6] [--seed 0]

Jobs (BreastMNIST, 28 px, real `accelerate launch` on CPU): SimCLR pretraining of a ResNet-18 (batched
views), the same with 2 CPU processes, and a fine-tune through the per-image path with EMA and mixup (the
most random state: dropout, mixup's numpy draws, the DataLoader's shuffle). Each job runs once
uninterrupted (the reference), then for each trial it is started, killed after a random delay drawn
uniformly over 10-80% of the reference's wall time by SIGKILL or SIGTERM (a preemption) sent to every process of
the run, and started again with the same command and resume=auto; a trial may be killed twice. Compared:
every line of metrics.jsonl (all columns but timings), results.json's numbers, and the final weights
file, byte for byte. Writes bench/results/fault_injection/table.md and table.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "results" / "fault_injection"
TIMING = ("pairs_per_s", "data_time_frac")
COMMON = [
    "--config", "configs/smoke.yaml", "data.source=breastmnist.npz", "--warn-only", "model.name=resnet18",
    "data.size=28", "data.limit=0", "track.log_with=wandb", "track.wandb_mode=offline", "state.every_steps=4",
]  # fmt: skip
JOBS = {
    "pretrain": ("ssl/pretrain.py", ["ssl.epochs=4", "ssl.batch_size=32"], 1),
    "pretrain-2proc": ("ssl/pretrain.py", ["ssl.epochs=4", "ssl.batch_size=32"], 2),
    "finetune-per-image": (
        "finetune/train.py",
        [
            "train.epochs=4",
            "train.batch_size=32",
            "train.ema=0.9",
            "train.mixup=0.2",
            "train.patience=10",
            "data.augment_path=per_image",
        ],
        1,
    ),
}


def launch(script: str, procs: int, args: list[str]) -> subprocess.Popen:
    flags = ["--multi_gpu", "--num_processes", "2"] if procs > 1 else ["--cpu", "--num_processes", "1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if procs > 1 else dict(os.environ)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, script, *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )


def kill_run(name: str, sig: int, proc: subprocess.Popen) -> None:
    """The signal to every process of the run (the launcher and its workers), as a scheduler sends it."""
    subprocess.run(["pkill", f"-{signal.Signals(sig).name[3:]}", "-f", f"name={name}( |$)"], check=False)
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, signal.SIGKILL)


def wait_gone(name: str) -> None:
    """Until no process of the run is left (a SIGTERMed run saves its state after the launcher is gone)."""
    while subprocess.run(["pgrep", "-f", f"name={name}( |$)"], capture_output=True).returncode == 0:
        time.sleep(0.2)


def final(run: Path, job: str) -> dict:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    metrics = [{k: v for k, v in m.items() if k not in TIMING} for m in lines]
    weights = (run / "checkpoint" / "backbone.safetensors").read_bytes()
    results = json.loads((run / "results.json").read_text())
    keep = {k: results[k] for k in ("final_loss", "knn/val_accuracy", "test") if k in results}
    return {"metrics": metrics, "weights": weights, "results": json.dumps(keep, sort_keys=True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", nargs="+", default=list(JOBS))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"lowshot-faults-{os.getpid()}"
    rows = []
    for job in args.jobs:
        script, extra, procs = JOBS[job]
        base = [*COMMON, *extra, f"out_dir={out_dir}"]
        t0 = time.perf_counter()
        ref = launch(script, procs, [*base, f"name={job}-ref"])
        assert ref.wait() == 0, ref.stderr.read().decode()[-2000:] if ref.stderr else ""
        wall = time.perf_counter() - t0
        want = final(out_dir / f"{job}-ref", job)
        for trial in range(args.trials):
            name, kills, t_start = f"{job}-t{trial}", [], time.perf_counter()
            cmd = [*base, f"name={name}", "resume=auto"]
            for attempt in range(3):
                meta_file = out_dir / name / "meta.json"
                if (
                    attempt
                    and meta_file.is_file()
                    and json.loads(meta_file.read_text())["status"] == "finished"
                ):
                    break  # the kill came after the run had finished
                proc = launch(script, procs, cmd)
                if attempt < (2 if trial % 3 == 2 else 1):  # every third trial is killed twice
                    delay = rng.uniform(0.1, 0.8) * wall  # inside the run (its tail: the report)
                    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
                    try:
                        proc.wait(timeout=delay)
                    except subprocess.TimeoutExpired:
                        kill_run(name, sig, proc)
                        code = proc.wait()
                        wait_gone(name)
                        kills.append(
                            {"signal": signal.Signals(sig).name, "after_s": round(delay, 1), "exit": code}
                        )
                        continue
                rc = proc.wait()
                assert rc == 0, (
                    f"{name}: exit {rc}: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}"
                )
                break
            meta = json.loads((out_dir / name / "meta.json").read_text())
            got = final(out_dir / name, job)
            rows.append({
                "job": job,
                "trial": trial,
                "kills": kills,
                "resumed_from": [r.get("from", "none (no state yet: started again)") for r in meta.get("resumed", [])],
                "metrics_identical": got["metrics"] == want["metrics"],
                "results_identical": got["results"] == want["results"],
                "weights_identical": got["weights"] == want["weights"],
                "wall_s": round(time.perf_counter() - t_start, 1),
                "reference_wall_s": round(wall, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "table.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Fault injection: kill at a random moment, continue with resume=auto, compare",
        "",
        f"`python bench/fault_injection.py --trials {args.trials} --seed {args.seed}` (2 CPU cores). Each trial "
        "is killed (SIGKILL, or SIGTERM = preemption) after a random 10-80% of the reference's wall time, "
        "then continued by the same command with resume=auto; every third trial is killed twice. "
        "Identical = every metrics.jsonl line (timings aside), results.json and the weights file byte for byte.",
        "",
        "| job | trial | kills (signal @ s → exit) | continued from | metrics | results | weights | wall s (ref) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kills = (
            ", ".join(f"{k['signal']} @ {k['after_s']} → {k['exit']}" for k in r["kills"]) or "finished first"
        )
        lines.append(
            f"| {r['job']} | {r['trial']} | {kills} | {', '.join(r['resumed_from']) or '—'} | "
            f"{'same' if r['metrics_identical'] else 'DIFFERENT'} | {'same' if r['results_identical'] else 'DIFFERENT'} | "
            f"{'same' if r['weights_identical'] else 'DIFFERENT'} | {r['wall_s']} ({r['reference_wall_s']}) |"
        )
    same = sum(r["metrics_identical"] and r["results_identical"] and r["weights_identical"] for r in rows)
    lines += [
        "",
        f"{same} of {len(rows)} continued runs ended bit-identical to their uninterrupted reference. "
        "Continued from '—': killed before its first state (started again), or signalled after its last "
        "training step (it finished its evaluation and exited normally). Exit 1: torchrun's agent.",
    ]
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
