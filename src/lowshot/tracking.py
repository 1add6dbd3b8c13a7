"""A run: its Accelerator, its local directory and its W&B run.

Every run writes a plain directory ``out_dir/name/`` (``config.yaml``, ``meta.json`` with the seed,
git sha, exact command and versions, ``metrics.jsonl``, ``results.json``, checkpoints) and, unless
``track.log_with=none``, logs through Accelerate's W&B tracker: project, group (the experiment),
job_type, tags, the resolved config, per-epoch metrics and the final results as the summary.
Without an API key W&B runs offline (``run_dir/wandb/offline-run-*``, ``wandb sync`` uploads it later)
and never waits for a network.

The run folder's file names, readers and provenance are :mod:`lowshot.run_folder`'s; the test split's
ledger is :mod:`lowshot.lockbox`'s; device settings (precision, memory layout) :mod:`lowshot.device`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from . import run_folder as rf
from .config import Config, ConfigError, flatten, to_dict, to_yaml
from .data import Store
from .data.cache import write_atomic
from .data.decode import file_digest
from .device import mixed_precision
from .lockbox import open_lockbox
from .models import check_weights_exist, weights_kind
from .resume import plan
from .wandb_mode import set_wandb_mode, wandb_key

log = logging.getLogger(__name__)


def make_accelerator(cfg: Config, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator (device, processes, mixed precision, trackers).

    ``find_unused_parameters``: for models whose frozen part changes during training. DDP registers the
    parameters that require grad when it wraps the model; with this flag every parameter is registered
    and those without a gradient in a step (frozen ones) are skipped instead of awaited."""
    log_with = None
    if cfg.track.log_with == "wandb":
        set_wandb_mode(cfg.track.wandb_mode)
        log_with = "wandb"
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg.mixed_precision),
        log_with=log_with,
        kwargs_handlers=handlers,
        dynamo_backend="inductor"
        if cfg.compile
        else None,  # None: `accelerate launch --dynamo_backend` decides
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        # `accelerate launch --multi_gpu` on a machine without CUDA starts N processes that each
        # believe they are alone: N copies of one run, silently. Refuse.
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate sees {accelerator.num_processes}. On CPU, launch with "
            "ACCELERATE_USE_CPU=1 (e.g. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...` "
            "or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...`)."
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if accelerator.device.type == "cpu" and launched == 1 and torch.get_num_threads() == 1 and cores > 1:
        # `accelerate launch` and `accelerate launch --cpu` (without --num_processes 1) export
        # OMP_NUM_THREADS=1: one core of many, ~1.7x slower here on 2 cores.
        log.warning(
            "this CPU run uses 1 thread of %d cores (OMP_NUM_THREADS=%s). Launch with "
            "`accelerate launch --cpu --num_processes 1 ...` or set OMP_NUM_THREADS=%d.",
            cores,
            os.environ.get("OMP_NUM_THREADS", "unset"),
            cores,
        )
    return accelerator


def preflight(cfg: Config) -> None:
    """What can fail without the data, checked before any decoding: the output folder can be written, the
    weights exist, and W&B online was not demanded without a key (ConfigError naming the fix)."""
    out = Path(cfg.out_dir).expanduser()
    # written to where out_dir will be made, without making it: a run that fails on its data leaves no
    # empty runs/ folder behind (issue 41)
    nearest = next(p for p in (out, *out.parents) if p.exists())
    try:
        probe = nearest / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"out_dir={cfg.out_dir} cannot be written ({err.strerror}); choose another out_dir"
        ) from None
    check_weights_exist(cfg.model.weights)
    plan(cfg)  # a finished run in out_dir/name, an unfinished one without resume=, other settings: refused
    online = cfg.track.wandb_mode == "online" or (
        cfg.track.wandb_mode == "auto" and os.environ.get("WANDB_MODE") == "online"
    )
    if cfg.track.log_with == "wandb" and online and not wandb_key():
        where = (
            "track.wandb_mode=online"
            if cfg.track.wandb_mode == "online"
            else "WANDB_MODE=online (environment)"
        )
        raise ConfigError(
            f"{where} but no W&B API key (WANDB_API_KEY or `wandb login`); use track.wandb_mode=auto or "
            "offline (and unset WANDB_MODE) to log offline and `wandb sync` later"
        )


class Run:
    """The local run directory and the tracker of one job (pretrain / probe / finetune)."""

    def __init__(
        self, accelerator: Accelerator, cfg: Config, job_type: str, data_name: str, overrides: list[str]
    ):
        self.accelerator, self.cfg, self.job_type = accelerator, cfg, job_type
        self.plan = plan(cfg)  # a new directory, or one to empty (overwrite) or to continue (resume)
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"  # parallel sweep runs stay apart
        name = self.plan.dir.name if self.plan.dir else f"{job_type}-{data_name}-{cfg.model.name}-{stamp}"
        if accelerator.num_processes > 1:  # one name for all processes
            name = broadcast_object_list([name])[0]
        self.dir = self.plan.dir or Path(cfg.out_dir) / name
        self.name, self.lines = name, 0  # lines: of metrics.jsonl, so a continued run writes none twice
        self.tags = [data_name, cfg.model.name, f"weights:{weights_kind(cfg.model.weights)}", job_type]
        self.meta: dict[str, Any] = {
            "job_type": job_type,
            "seed": cfg.seed,
            "git_sha": rf.git_sha(),
            "command": rf.typed_command(rf.parent_argv(), [Path(sys.executable).name, *sys.argv]),
            "overrides": overrides,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device)
            + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            # Part of what reproduces a number: on the same split and code, the BUSI recipe reference once
            # gave other test AUROCs in another session, whose processor and package versions were not
            # recorded (EXPERIMENTS.md, 2026-12-06); BreastMNIST's reproduced exactly across three sessions.
            "cpu": rf.cpu_model(),
            "mixed_precision": accelerator.mixed_precision,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            # running | stopped (a state to continue from) | failed (an error ended it: "failure" says which) |
            # finished; a killed run stays "running"
            "status": "running",
            "python": platform.python_version(),
            "versions": rf.versions(),
        }
        if self.plan.note:
            accelerator.print(self.plan.note)
        if self.plan.state is not None:  # the run's own record, with this continuation added
            before = rf.read_meta(self.dir)
            now = {k: self.meta[k] for k in ("command", "started", "git_sha", "world_size", "device")}
            self.meta = {**before, "status": "running", "resumed": [*before.get("resumed", []), now]}
        accelerator.wait_for_everyone()  # every process has read the old meta.json before it changes
        if accelerator.is_main_process:
            self._lock()
            if self.plan.wipe:
                shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dir / rf.CONFIG, to_yaml(cfg))
            self._write_meta()
            if self.plan.state is None:
                self.metrics_file = open(self.dir / rf.METRICS, "w")  # noqa: SIM115 - open for the run's life
            self._record_failure()
        if cfg.track.log_with == "wandb":
            self._init_wandb(data_name)
        accelerator.wait_for_everyone()

    def _lock(self) -> None:
        """Hold ``out_dir/.<name>.lock`` for the run's life (released by the OS when the process dies, however
        it dies), so a second run (a restart while the first still runs) never writes into the same folder."""
        from filelock import FileLock, Timeout

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._dir_lock = FileLock(self.dir.parent / f".{self.dir.name}.lock")
        try:
            self._dir_lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"run directory {self.dir} is in use by another running process; wait for it or stop it first"
            ) from None

    def resumed(self, state: Path, lines: int) -> None:
        """Continue metrics.jsonl after the ``lines`` the state had seen (main process): the epochs logged
        after that state are logged again by the continued run, so none appears twice."""
        self.lines = lines
        if self.accelerator.is_main_process:
            path = self.dir / rf.METRICS
            kept = path.read_text().splitlines(keepends=True)[:lines] if path.is_file() else []
            write_atomic(path, "".join(kept))
            self.metrics_file = open(path, "a")  # noqa: SIM115 - open for the run's life
            self.meta["resumed"][-1]["from"] = state.name
            self._write_meta()
            if (wb := self._wandb()) is not None and wb.offline:
                # W&B cannot continue an offline run (wandb.init ignores resume= offline, and `wandb sync` of two
                # folders with one id keeps one of them): the new folder gets the whole history again, and the
                # stopped runs' folders are set aside, so `wandb sync wandb/offline-run-*` sends the complete run.
                for line in kept:
                    row = json.loads(line)
                    wb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
                here = Path(wb.dir).parent.name
                for old in (self.dir / "wandb").glob("offline-run-*"):
                    if old.name != here:
                        old.rename(old.with_name(f"superseded-{old.name}"))

    def note_state(self, state: Path, epoch: int, position: int) -> None:
        """Record the newest state in meta.json (main process)."""
        self.meta["state"] = {"path": state.name, "epoch": epoch, "batch": position}
        self._write_meta()

    def stopped(self, state: Path) -> None:
        """A signal stopped the run after ``state`` was saved: say how to continue, close the trackers."""
        if self.accelerator.is_main_process:
            self.meta["status"] = "stopped"
            self._write_meta()
        script = next((a for a in sys.argv if a.endswith(".py")), sys.argv[0])
        args = [
            a for a in sys.argv[sys.argv.index(script) + 1 :] if not a.startswith(("resume=", "--resume="))
        ]
        again = shlex.join(["accelerate", "launch", script, *args, f"resume={self.dir}"])
        self.accelerator.print(f"lowshot: stopped; state {state} saved. Continue with:\n  {again}")
        self.accelerator.end_training()

    def _init_wandb(self, data_name: str) -> None:
        kwargs: dict[str, dict[str, Any]] = {
            "wandb": {
                "name": self.name,
                "group": run_group(self.cfg, self.name),
                "job_type": self.job_type,
                "tags": [*self.tags, *self.cfg.track.tags],
                "dir": str(self.dir.resolve()),
                "notes": self.meta["command"],
            }
        }
        if self.plan.state is not None and "wandb" in self.meta:  # the same W&B run, continued
            kwargs["wandb"] |= {"id": self.meta["wandb"]["id"], "resume": "allow"}
        self.meta["lineage"] = lineage = source_artifact(self.cfg.model.weights)
        config = {**flatten(to_dict(self.cfg)), "meta": self.meta}
        try:
            self.accelerator.init_trackers(self.cfg.track.project, config=config, init_kwargs=kwargs)
        except Exception as err:  # e.g. the server went away: log offline rather than fail the run
            log.warning("W&B online init failed (%s); logging offline instead", err)
            kwargs["wandb"]["mode"] = "offline"  # the environment is no longer read once wandb has started
            self.accelerator.init_trackers(self.cfg.track.project, config=config, init_kwargs=kwargs)
        if (wb := self._wandb()) is not None:
            self.meta["wandb"] = {"id": wb.id, "project": self.cfg.track.project, "offline": bool(wb.offline)}
            self.meta["wandb"]["group"] = kwargs["wandb"][
                "group"
            ]  # a run from this one's checkpoint joins it
            if lineage and not wb.offline:
                # The lineage edge pretraining artifact → this run. W&B refuses use_artifact offline ("Cannot
                # use artifact when in offline mode"), so offline runs carry it in config.meta.lineage only.
                try:
                    wb.use_artifact(f"{lineage['artifact']}:{lineage['alias']}")
                except Exception as err:  # e.g. the pretraining run was never synced
                    log.warning("W&B: could not mark %s as used (%s)", lineage["artifact"], err)

    def _record_failure(self) -> None:
        """An error that ends the script (bad weights, divergence, a crash) marks the run ``failed`` in
        meta.json, with the error's first line, before the error is printed; a rerun of the same name then
        starts it again instead of being refused as unfinished (issue 41; lowshot.resume.plan)."""
        previous = sys.excepthook

        def hook(kind: type[BaseException], err: BaseException, tb: TracebackType | None) -> None:
            if self.meta.get("status") == "running":
                first = (str(err).splitlines() or [""])[0][:500]
                self.meta |= {"status": "failed", "failure": f"{kind.__name__}: {first}"}
                self.meta["failed"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                with contextlib.suppress(OSError):  # a full disk: the error itself still gets printed
                    self._write_meta()
            previous(kind, err, tb)

        sys.excepthook = hook

    def _write_meta(self) -> None:
        rf.write_meta(self.dir, self.meta)

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics to ``metrics.jsonl`` and the tracker (main process only)."""
        self.lines += 1
        if self.accelerator.is_main_process:
            self.metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.metrics_file.flush()
        self.accelerator.log(metrics, step=step)

    def _wandb(self) -> Any:
        """The W&B run on the main process when tracking with W&B, else None."""
        if self.accelerator.is_main_process and self.cfg.track.log_with == "wandb":
            return self.accelerator.get_tracker("wandb", unwrap=True)
        return None

    def log_image(self, key: str, path: Path) -> None:
        """A PNG of the run directory into the W&B run (main process)."""
        if (wb := self._wandb()) is not None:
            import wandb

            wb.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        """Rows of equal keys as a W&B table (main process); list-valued columns stay in results.json."""
        if (wb := self._wandb()) is not None and rows:
            import wandb

            keys = [k for k, v in rows[0].items() if not isinstance(v, list | tuple)]
            wb.log(
                {key: wandb.Table(columns=list[str | int](keys), data=[[r[k] for k in keys] for r in rows])}
            )

    def log_model(self, files: list[Path], kind: str, weights: Path) -> None:
        """The run's model files as a W&B artifact of type "model" named ``<run name>-<kind>`` with the alias
        ``sha-<first 12 hex of sha1(weights)>`` (what a later run that starts from them names), and that
        name written into ``meta.json`` beside them, so a fine-tune finds it (main process, W&B on)."""
        if (wb := self._wandb()) is None:
            return
        import wandb

        info = {
            "artifact": artifact_name(f"{self.name}-{kind}"),
            "alias": f"sha-{file_digest(weights, 'sha1')[:12]}",
            "run_id": wb.id,
        }
        meta_file = weights.parent / rf.META
        if meta_file.is_file():
            write_atomic(
                meta_file, json.dumps({**json.loads(meta_file.read_text()), "wandb_artifact": info}, indent=2)
            )
        art = wandb.Artifact(
            info["artifact"], type="model", metadata={"kind": kind, **self.meta.get("lineage", {})}
        )
        for f in files:
            if f.is_dir():
                art.add_dir(str(f), name=f.name)
            elif f.is_file():
                art.add_file(str(f))
        wb.log_artifact(art, aliases=["latest", info["alias"]])
        self.meta["wandb_artifact"] = info

    def log_predictions(
        self, images: np.ndarray, paths: np.ndarray, y: np.ndarray, prob: np.ndarray, decision: np.ndarray,
        classes: list[str],
    ) -> None:  # fmt: skip
        """A per-image W&B table of the test split (image, path, label, decision at the operating point,
        argmax, correct, probability per class): error analysis in the W&B UI (main process, W&B on)."""
        if (wb := self._wandb()) is None:
            return
        import wandb

        cols = [
            "image",
            "path",
            "label",
            "predicted",
            "predicted_argmax",
            "correct",
            *[f"p_{c}" for c in classes],
        ]
        table = wandb.Table(columns=list[str | int](cols))
        for a, p, t, pr, d in zip(images, paths, y, prob, decision, strict=True):
            row = [
                wandb.Image(a[..., 0] if a.shape[-1] == 1 else a),
                str(p),
                classes[int(t)],
                classes[int(d)],
            ]
            table.add_data(*row, classes[int(pr.argmax())], bool(d == t), *[float(v) for v in pr])
        wb.log({"test/predictions": table})

    def open_test(self, store: Store) -> np.ndarray:
        """Unseal the store's test split for the final evaluation and record it in the lockbox ledger;
        returns the test rows. How often that test split was opened before goes into meta.json."""
        if not self.accelerator.is_main_process:
            return store.unseal()
        rows, opened = open_lockbox(store, self.cfg, self.dir, self.job_type)
        self.meta["lockbox"] = {**opened, "reads_this_run": store.test_reads}
        self._write_meta()
        return rows

    def save_predictions(self, **arrays: np.ndarray) -> None:
        """``predictions.npz`` (e.g. val_prob, val_y, test_prob, test_y, test_path): what `lowshot report`
        and `lowshot compare` read; two runs compare only on the same test images."""
        if self.accelerator.is_main_process:
            rf.write_predictions(self.dir, **arrays)

    def finish(
        self, results: dict[str, Any], figures: Callable[[Path], dict[str, Path]] | None = None
    ) -> None:
        """Write ``results.json``, log the figures ``figures(run_dir)`` draws there (``figures.run_figures``:
        learning curves, ROC, confusion matrix, reliability; tracking records, it does not draw) to W&B,
        put the headline numbers in the W&B summary, close
        trackers; only then is the run marked finished (meta.json) and its training states deleted, so a
        kill at any moment before leaves a run that ``resume=auto`` completes."""
        if self.accelerator.is_main_process:
            rf.write_results(self.dir, results)
            self.metrics_file.close()
            for key, path in (figures(self.dir) if figures else {}).items():
                self.log_image(f"report/{key}", path)
            if "test" in results:  # the headline test metrics with their CIs, as a W&B table too
                rows = [{"metric": m, **v} for m, v in results["test"]["metrics"].items()]
                self.log_table("report/test_metrics", rows)
        if (wb := self._wandb()) is not None:
            wb.summary.update(
                {k: v for k, v in flatten(results).items() if isinstance(v, (int, float, str, bool))}
            )
            wb.summary.update(rf.headline(results))
        self.accelerator.end_training()
        if self.accelerator.is_main_process:
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self.meta["status"] = "finished"
            self._write_meta()
            shutil.rmtree(self.dir / "state", ignore_errors=True)  # a finished run is not continued


def artifact_name(name: str) -> str:
    """A W&B artifact name: letters, digits, '-', '_' and '.' only."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def run_group(cfg: Config, name: str) -> str:
    """The W&B group (the experiment): ``track.group``; else the group of the run whose checkpoint
    ``model.weights`` is (a probe or fine-tune of a pretraining run joins it; issue 41); else the run's name."""
    if cfg.track.group:
        return cfg.track.group
    if weights_kind(cfg.model.weights) == "checkpoint":
        group = rf.read_meta(Path(cfg.model.weights).expanduser()).get("wandb", {}).get("group")
        if group:
            return str(group)
    return name


def source_artifact(weights: str) -> dict[str, str]:
    """The W&B artifact a lowshot checkpoint was logged as (from its meta.json), if any: the lineage of a
    run that starts from it."""
    if weights_kind(weights) != "checkpoint":
        return {}
    info = rf.read_meta(Path(weights).expanduser()).get("wandb_artifact")
    return dict(info) if info else {}
