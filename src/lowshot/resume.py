"""Training states that survive a kill, a preemption or a crash, and runs that continue from them.

A state is a folder ``run_dir/state/step-<8 digits>/``: what Accelerate's ``save_state`` writes (model,
optimizer, grad scaler, the registered objects — scheduler, EMA weights, early stopping with its best
weights — and every process's python/numpy/torch/CUDA RNG) plus ``progress_<rank>.pt``, lowshot's
per-process part: epoch, step, the position inside the epoch, the epoch's partial sums, the number of
metrics.jsonl lines written, and the training loader's state. For the batched path (``DeviceLoader``)
that is its augmentation generator, so a state inside an epoch continues at the next batch; for the
per-image path it is the RNG at the epoch's start, from which the epoch's first batches are drawn again
and dropped. Either way the continued run takes the same steps on the same batches as one that was never
stopped: bit-identical on the same machine and thread count (tests/test_resume.py,
bench/fault_injection.py).

When: every ``state.every_minutes`` (5; at the next step or epoch end), after the last epoch (a kill
during the final evaluation redoes only that), and optionally every ``state.every`` epochs and
``state.every_steps`` steps. On a few hundred images an epoch can take less time than a save, so
per-epoch states are not the default.

States are written into ``state/.tmp-step-N`` and renamed when every process has written its part, so a
kill during a save leaves the previous state; the newest ``state.keep`` are kept. SIGTERM and SIGINT (a
scheduler's preemption, Ctrl-C) save a state after the current step and exit with the command that
continues the run (exit status 143 / 130); a second Ctrl-C stops at once.

``plan`` decides, before any data is decoded, what a run directory that already exists means: a finished
run is never overwritten without ``overwrite=true``; an unfinished one (meta.json's status is not
"finished", the last thing a run writes) is continued by
``resume=auto`` (or ``resume=RUN_DIR``) from its newest state, with the settings it was started with.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from .config import Config, ConfigError, StateConfig, flatten, load_yaml, to_dict
from .guard import DivergenceError
from .run_folder import CONFIG, META, RESULTS, read_meta

log = logging.getLogger(__name__)

STATE = "state"
_NAME = re.compile(r"step-(\d{8})$")
# Settings that may differ between a run and its continuation: where it lives, how it is resumed, how
# many loader workers, how W&B connects. Anything else would make the continuation another experiment.
SIGNAL_EVERY = 8  # steps between the processes' checks for a SIGTERM/SIGINT that one of them received
MAY_DIFFER = {"name", "out_dir", "resume", "overwrite", "data.num_workers", "track.wandb_mode"}


class Preempted(SystemExit):
    """SIGTERM or SIGINT arrived: a state was saved after the current step and the run stops."""


@dataclass
class Plan:
    dir: Path | None  # the run directory; None = a new one, named by the Run
    state: Path | None = None  # the state to continue from
    wipe: bool = False  # empty the directory first (overwrite=true, or an unfinished run without a state)
    note: str = ""


def saved_states(run_dir: Path) -> list[Path]:
    """The complete states of a run, oldest first (temporaries and half-deleted ones are not listed)."""
    folder = Path(run_dir) / STATE
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "progress_0.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def finished(run_dir: Path) -> bool:
    """A run is finished once meta.json says so (its last write); runs from before that field: results.json."""
    meta = run_dir / META
    status = json.loads(meta.read_text()).get("status") if meta.is_file() else None
    return status == "finished" or (status is None and (run_dir / RESULTS).is_file())


def plan(cfg: Config) -> Plan:
    """What this run does with its directory (pure: nothing is written; ``Run`` acts on it)."""
    if cfg.resume not in ("", "auto"):
        target = Path(cfg.resume).expanduser()
        if not (target / CONFIG).is_file():
            raise ConfigError(f"resume={cfg.resume}: not a lowshot run directory (no config.yaml there)")
    elif cfg.name:
        target = Path(cfg.out_dir).expanduser() / cfg.name
    elif cfg.resume == "auto":
        raise ConfigError("resume=auto continues the run in out_dir/name: give name=... (or resume=RUN_DIR)")
    else:
        return Plan(None)
    if not (target / CONFIG).is_file():
        return Plan(target)
    states = saved_states(target)
    if cfg.overwrite:
        return Plan(target, wipe=True, note=f"overwrite=true: {target} is emptied and started again")
    if finished(target):
        raise ConfigError(
            f"run directory {target} holds a finished run; choose another name=, or overwrite=true to replace it"
        )
    where = f"its newest state is {states[-1].name}" if states else "it saved no state"
    failure = read_meta(target).get("failure") if read_meta(target).get("status") == "failed" else None
    if failure and not cfg.resume:  # an error ended it: a rerun starts it again (resume=auto continues it)
        return Plan(target, wipe=True, note=f"{target} failed ({failure}): starting it again")
    if not cfg.resume:
        raise ConfigError(
            f"run directory {target} holds an unfinished run ({where}); continue it with resume=auto, or "
            "overwrite=true to start it again"
        )
    if not states:
        return Plan(target, wipe=True, note=f"{target} saved no state before it stopped: starting it again")
    same_settings(target, cfg)
    return Plan(target, states[-1], note=f"continuing {target} from {states[-1].name}")


def same_settings(run_dir: Path, cfg: Config) -> None:
    """Refuse to continue a run with other settings than it started with (ConfigError listing them)."""
    before = flatten(to_dict(load_yaml(run_dir / CONFIG)))
    now = flatten(to_dict(cfg))
    changed = [
        k for k in sorted(set(before) | set(now)) if k not in MAY_DIFFER and before.get(k) != now.get(k)
    ]
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} → {now.get(k)!r}" for k in changed[:6])
        raise ConfigError(
            f"resume: {run_dir} was started with other settings ({shown}"
            f"{', ...' if len(changed) > 6 else ''}); give the same settings, or start a new run"
        )


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (python, numpy, torch, CUDA) as plain tensors and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sampler_generator(loader: Any) -> torch.Generator | None:
    """The generator a (prepared) DataLoader's sampler shuffles with, if it has its own."""
    node = getattr(getattr(loader, "loader", loader), "batch_sampler", None)
    while node is not None and not isinstance(getattr(node, "generator", None), torch.Generator):
        node = getattr(node, "batch_sampler", None) or getattr(node, "sampler", None)
    return getattr(node, "generator", None) if node is not None else None


class States:
    """Saves and restores a training loop's state; counts its steps and positions (see the module doc).

    ``loader``: the training loader (``DeviceLoader`` or ``Rebatch``); ``objects``: what Accelerate saves
    beside the prepared model and optimizer (anything with ``state_dict``/``load_state_dict``)."""

    def __init__(self, accelerator: Accelerator, run: Any, sc: StateConfig, loader: Any, *objects: Any):
        self.accelerator, self.run, self.sc, self.loader = accelerator, run, sc, loader
        self.dir = Path(run.dir) / STATE
        accelerator.register_for_checkpointing(*[o for o in objects if o is not None])
        self.epoch = self.step = self.position = 0
        self.sums: dict[str, Any] | None = None  # the running epoch's partial sums (loss, counts)
        self.extra: dict[str, Any] = {}  # what the script keeps across epochs (kNN, guard's start norm, ...)
        self.epoch_rng: dict[str, Any] | None = None
        self.signalled = 0
        self.last_save = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once
        if self.signalled:
            # A second SIGTERM is the same request, not an order to die: a scheduler signals every process
            # and the launcher passes its own on (accelerate launch >= 1.16, torchrun), so one arrives twice.
            return
        self.signalled = signum
        self.accelerator.print(f"\nlowshot: {signal.Signals(signum).name}: saving a state after this step")

    # ---- the loop ---------------------------------------------------------------------------------------
    def batches(self, epoch: int) -> Iterator[Any]:
        """The training batches of ``epoch`` from the saved position on (all of them in a fresh epoch)."""
        self.epoch, skip = epoch, self.position
        if hasattr(self.loader, "generator"):  # DeviceLoader: its permutation is a function of the epoch
            self.loader.epoch, self.loader.start = epoch, skip
            yield from self.loader
            return
        now = rng_state()
        gen = _sampler_generator(self.loader)
        if skip and self.epoch_rng is not None:  # draw the epoch's first batches again, from its start
            set_rng_state(self.epoch_rng["global"])
            if gen is not None:
                gen.set_state(self.epoch_rng["sampler"])
        else:
            self.epoch_rng = {"global": now, "sampler": gen.get_state() if gen is not None else None}
        for i, batch in enumerate(self.loader):
            if i < skip:
                if i == skip - 1:
                    set_rng_state(now)  # the RNG the stopped run had after its last step
                continue
            yield batch

    def _agreed(self, check: bool) -> tuple[bool, bool]:
        """(stop, time for a state) as every process sees it: the main process's clock decides the time,
        and a signal to any process stops all. With several processes the flags are summed only when
        ``check`` (a sum is a synchronisation, which a GPU should not pay at every step)."""
        late = bool(self.sc.every_minutes) and time.monotonic() - self.last_save >= 60 * self.sc.every_minutes
        if self.accelerator.num_processes == 1:
            return bool(self.signalled), late
        if not check:
            return False, False
        flags = [self.signalled, late and self.accelerator.is_main_process]
        total = self.accelerator.reduce(torch.tensor(flags, device=self.accelerator.device), reduction="sum")
        return bool(total[0]), bool(total[1])

    def after_step(self, sums: dict[str, Any]) -> None:
        """Call after every optimizer step (and momentum update) with the epoch's running sums."""
        self.position += 1
        self.step += 1
        self.sums = sums
        stop, late = self._agreed(self.step % SIGNAL_EVERY == 0)
        if stop or late or (self.sc.every_steps and self.step % self.sc.every_steps == 0):
            saved = self.save()
            if stop:
                self.run.stopped(saved)
                raise Preempted(130 if self.signalled == signal.SIGINT else 143)

    def end_epoch(self, epochs: int) -> None:
        """Call when an epoch is done (after its metrics were logged); saves after the last epoch, every
        ``state.every`` epochs, and when ``state.every_minutes`` have passed since the last state."""
        self.epoch, self.position, self.sums = self.epoch + 1, 0, None
        _, late = self._agreed(True)
        if late or self.epoch == epochs or (self.sc.every and self.epoch % self.sc.every == 0):
            self.save()

    # ---- saving and restoring -----------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a state atomically (all processes take part); returns its folder."""
        acc, final = self.accelerator, self.dir / f"step-{self.step:08d}"
        if final.is_dir():
            return final
        loss = (self.sums or {}).get("total")
        if loss is not None and not bool(torch.isfinite(acc.reduce(loss.detach().clone(), "sum"))):
            raise DivergenceError(  # the newest state on disk stays the last good one
                f"step {self.step}: the training loss is not finite; no state was saved from these weights "
                f"(the last good one: {([p.name for p in saved_states(self.dir.parent)] or ['none'])[-1]}). Try a "
                "10x lower lr, a longer warmup, or mixed_precision=no."
            )
        tmp = self.dir / f".tmp-{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        progress = {
            "epoch": self.epoch,
            "step": self.step,
            "position": self.position,
            "sums": self.sums,
            "extra": self.extra,
            "logged": self.run.lines,
            "epoch_rng": self.epoch_rng,
            "loader": self.loader.generator.get_state() if hasattr(self.loader, "generator") else None,
        }
        mine = tmp / f"progress_{acc.process_index}.pt"
        torch.save(progress, mine.with_suffix(".part"))
        os.replace(mine.with_suffix(".part"), mine)
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.replace(tmp, final)
            for old in saved_states(self.dir.parent)[: -self.sc.keep]:
                trash = old.with_name(f".old-{old.name}-{secrets.token_hex(2)}")  # never half a state listed
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            self.run.note_state(final, self.epoch, self.position)
        acc.wait_for_everyone()
        self.last_save = time.monotonic()
        return final

    def restore(self, state: Path) -> dict[str, Any]:
        """Load ``state`` into the prepared objects and the counters; returns the script's ``extra``."""
        saved_by = len(list(state.glob("progress_*.pt")))
        if saved_by != self.accelerator.num_processes:  # each process continues its own RNG and loader share
            raise ConfigError(
                f"resume: {state} was saved by {saved_by} process(es); continue it with {saved_by}, not "
                f"{self.accelerator.num_processes} (--num_processes {saved_by})"
            )
        self.accelerator.load_state(str(state))
        p = torch.load(state / f"progress_{self.accelerator.process_index}.pt", weights_only=True)
        self.epoch, self.step, self.position = p["epoch"], p["step"], p["position"]
        self.sums, self.extra, self.epoch_rng = p["sums"], p["extra"], p["epoch_rng"]
        if p["loader"] is not None:
            self.loader.generator.set_state(p["loader"])
        self.run.resumed(state, p["logged"])
        self.accelerator.print(
            f"resumed from {state} (epoch {self.epoch + 1}, batch {self.position} of it, step {self.step})"
        )
        return self.extra
