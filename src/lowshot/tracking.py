"""A run: its Accelerator, its local directory and its W&B run.

Every run writes a plain directory ``out_dir/name/`` (``config.yaml``, ``meta.json`` with the seed,
git sha, exact command and versions, ``metrics.jsonl``, ``results.json``, checkpoints) and, unless
``track.log_with=none``, logs through Accelerate's W&B tracker: project, group (the experiment),
job_type, tags, the resolved config, per-epoch metrics and the final results as the summary.
Without an API key W&B runs offline (``run_dir/wandb/offline-run-*``, ``wandb sync`` uploads it later)
and never waits for a network.

The test split's lockbox ledger lives in the cache folder (``lockbox/<data>-<test digest>.jsonl``):
every run that opens a test split appends a line, so a report can say how often that test set had
already been looked at, i.e. how far its number may be the best of many tries.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import platform
import secrets
import shlex
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list

from .config import Config, ConfigError, flatten, setting_key, to_dict, to_yaml
from .data import Store, cache_root
from .models import reachable, weights_kind

log = logging.getLogger(__name__)


def mixed_precision(setting: str) -> str:
    """'auto' → bf16 on CUDA, fp32 ('no') elsewhere: bf16 autocast on CPUs without bf16 instructions
    (AVX2) ran 16-24x slower than fp32 here. An ``accelerate launch --mixed_precision`` wins over auto."""
    if setting != "auto":
        return setting
    env = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if env != "no":
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def memory_format(setting: str, device: torch.device) -> torch.memory_format:
    """``channels_last``: NHWC on a GPU for "auto" (convolutions on tensor cores run in NHWC; NCHW
    weights cost a transpose per layer), the default layout elsewhere."""
    on = setting == "on" or (setting == "auto" and device.type == "cuda")
    return torch.channels_last if on else torch.contiguous_format


def make_accelerator(cfg: Config, find_unused_parameters: bool = False) -> Accelerator:
    """The run's Accelerator (device, processes, mixed precision, trackers).

    ``find_unused_parameters``: for models whose frozen part changes during training. DDP registers the
    parameters that require grad when it wraps the model; with this flag every parameter is registered
    and those without a gradient in a step (frozen ones) are skipped instead of awaited."""
    log_with = None
    if cfg.track.log_with == "wandb":
        _set_wandb_mode(cfg.track.wandb_mode)
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


def _wandb_can_go_online() -> bool:
    """An API key (env or netrc) and the W&B server answering a TCP connect within 3 s."""
    import wandb

    url = urlparse(wandb.Settings().base_url)
    host = url.hostname or ""
    key = os.environ.get("WANDB_API_KEY")
    if not key:
        try:
            key = (netrc.netrc().authenticators(host) or (None, None, None))[2]
        except (OSError, netrc.NetrcParseError):
            key = None
    if not key:
        return False
    if reachable(url.geturl()):
        return True
    log.warning("W&B key found but %s is unreachable: logging offline", host)
    return False


def _set_wandb_mode(mode: str) -> None:
    if mode == "auto":
        if "WANDB_MODE" in os.environ:
            return  # the user's own choice
        mode = "online" if _wandb_can_go_online() else "offline"
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")  # seconds: a key without a network must not hang a run


def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Run:
    """The local run directory and the tracker of one job (pretrain / probe / finetune)."""

    def __init__(
        self, accelerator: Accelerator, cfg: Config, job_type: str, data_name: str, overrides: list[str]
    ):
        self.accelerator, self.cfg, self.job_type = accelerator, cfg, job_type
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"  # parallel sweep runs stay apart
        name = cfg.name or f"{job_type}-{data_name}-{cfg.model.name}-{stamp}"
        if accelerator.num_processes > 1:  # one name for all processes
            name = broadcast_object_list([name])[0]
        self.dir = Path(cfg.out_dir) / name
        if (self.dir / "config.yaml").exists():  # never mix two runs' files, never overwrite a result
            raise ConfigError(
                f"run directory {self.dir} already holds a run; choose another name= or remove it"
            )
        self.name = name
        self.tags = [data_name, cfg.model.name, f"weights:{weights_kind(cfg.model.weights)}", job_type]
        self.meta: dict[str, Any] = {
            "job_type": job_type,
            "seed": cfg.seed,
            "git_sha": git_sha(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "overrides": overrides,
            "world_size": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "device": str(accelerator.device)
            + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""),
            "mixed_precision": accelerator.mixed_precision,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "python": platform.python_version(),
            "versions": {
                p: _version(p) for p in ("torch", "timm", "lightly", "accelerate", "wandb", "scikit-learn")
            },
        }
        if accelerator.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.yaml").write_text(to_yaml(cfg))
            self._write_meta()
            self.metrics_file = open(self.dir / "metrics.jsonl", "w")  # noqa: SIM115 - open for the run's life
        if cfg.track.log_with == "wandb":
            self._init_wandb(data_name)
        accelerator.wait_for_everyone()

    def _init_wandb(self, data_name: str) -> None:
        kwargs = {
            "wandb": {
                "name": self.name,
                "group": self.cfg.track.group or self.name,
                "job_type": self.job_type,
                "tags": [*self.tags, *self.cfg.track.tags],
                "dir": str(self.dir.resolve()),
                "notes": self.meta["command"],
            }
        }
        config = {**flatten(to_dict(self.cfg)), "meta": self.meta}
        try:
            self.accelerator.init_trackers(self.cfg.track.project, config=config, init_kwargs=kwargs)
        except Exception as err:  # e.g. the server went away: log offline rather than fail the run
            log.warning("W&B online init failed (%s); logging offline instead", err)
            kwargs["wandb"]["mode"] = "offline"  # the environment is no longer read once wandb has started
            self.accelerator.init_trackers(self.cfg.track.project, config=config, init_kwargs=kwargs)

    def _write_meta(self) -> None:
        (self.dir / "meta.json").write_text(json.dumps(self.meta, indent=2))

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Per-epoch metrics to ``metrics.jsonl`` and the tracker (main process only)."""
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

    def open_test(self, store: Store) -> np.ndarray:
        """Unseal the store's test split for the final evaluation and record it in the lockbox ledger;
        returns the test rows. How often that test split was opened before goes into meta.json."""
        rows = store.unseal()
        ledger = cache_root(self.cfg.data) / "lockbox" / f"{store.name}-{store.test_digest()}.jsonl"
        if self.accelerator.is_main_process:
            ledger.parent.mkdir(parents=True, exist_ok=True)
            before = (
                [json.loads(line) for line in ledger.read_text().splitlines()] if ledger.is_file() else []
            )
            setting = setting_key(to_dict(self.cfg))
            entry = {
                "run": str(self.dir.resolve()),
                "job": self.job_type,
                "setting": setting,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            with open(ledger, "a") as f:
                f.write(json.dumps(entry) + "\n")
            self.meta["lockbox"] = {
                "ledger": str(ledger),
                "opened_before": len(before),
                "runs_before": len({e["run"] for e in before}),
                # openings by runs of other settings: the ones that can make this test number a selection
                "other_settings_before": len({e.get("setting") for e in before} - {setting}),
                "reads_this_run": store.test_reads,
            }
            self._write_meta()
        return rows

    def save_predictions(self, **arrays: np.ndarray) -> None:
        """``predictions.npz`` (e.g. val_prob, val_y, test_prob, test_y, test_path): what `lowshot report`
        and `lowshot compare` read; two runs compare only on the same test images."""
        if self.accelerator.is_main_process:
            np.savez_compressed(self.dir / "predictions.npz", allow_pickle=False, **arrays)

    def finish(self, results: dict[str, Any]) -> None:
        """Write ``results.json``, draw the run's report figures (learning curves, ROC, confusion matrix,
        reliability) into the run directory and W&B, put the headline numbers in the W&B summary, close
        trackers."""
        if self.accelerator.is_main_process:
            self.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            self._write_meta()
            (self.dir / "results.json").write_text(json.dumps(results, indent=2))
            self.metrics_file.close()
            from .report import run_figures  # matplotlib only where a report is drawn

            for key, path in run_figures(self.dir).items():
                self.log_image(f"report/{key}", path)
            if "test" in results:  # the headline test metrics with their CIs, as a W&B table too
                rows = [{"metric": m, **v} for m, v in results["test"]["metrics"].items()]
                self.log_table("report/test_metrics", rows)
        if (wb := self._wandb()) is not None:
            wb.summary.update(
                {k: v for k, v in flatten(results).items() if isinstance(v, (int, float, str, bool))}
            )
        self.accelerator.end_training()


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except Exception:
        return "absent"
