import json
import os
import time
from pathlib import Path

import pytest

from lowshot.config import parse_args
from lowshot.device import mixed_precision
from lowshot.run_folder import typed_command
from lowshot.tracking import run_group
from lowshot.wandb_mode import set_wandb_mode


def test_auto_mode_is_offline_without_a_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    set_wandb_mode("auto")
    assert os.environ["WANDB_MODE"] == "offline"


def test_a_key_without_a_network_goes_offline_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "https://127.0.0.1:9")  # nothing listens on the discard port
    t = time.perf_counter()
    set_wandb_mode("auto")
    assert os.environ["WANDB_MODE"] == "offline" and time.perf_counter() - t < 10


def test_users_own_mode_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    set_wandb_mode("auto")
    assert os.environ["WANDB_MODE"] == "disabled"
    set_wandb_mode("offline")
    assert os.environ["WANDB_MODE"] == "offline"


def test_precision_is_fp32_on_cpu_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert mixed_precision("auto") == "no"
    assert mixed_precision("bf16") == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    assert mixed_precision("auto") == "fp16"


def test_the_recorded_command_is_the_one_typed() -> None:
    """meta.json's command: the launcher's line when a launcher started the script (issue 41)."""
    own = ["python3", "ssl/pretrain.py", "ssl.epochs=2"]
    launched = [
        "/venv/bin/python",
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "ssl/pretrain.py",
        "ssl.epochs=2",
    ]
    assert typed_command(launched, own) == "accelerate launch --cpu ssl/pretrain.py ssl.epochs=2"
    typed = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "ssl/pretrain.py", "name=a b"]
    assert typed_command(typed, own) == "accelerate launch ssl/pretrain.py 'name=a b'"
    torchrun = ["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "ssl/pretrain.py"]
    assert typed_command(torchrun, own) == "torchrun --nproc_per_node 2 ssl/pretrain.py"
    assert typed_command(["bash"], own) == "python3 ssl/pretrain.py ssl.epochs=2"


def test_a_run_from_a_checkpoint_joins_its_pretraining_runs_group(tmp_path: Path) -> None:
    """Runs made step by step (the README's one workflow) are grouped without track.group (issue 41)."""
    ckpt = tmp_path / "pre" / "checkpoint"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"wandb": {"id": "abc", "group": "pre"}}))
    assert run_group(parse_args([f"model.weights={ckpt}"])[0], "probe") == "pre"
    assert run_group(parse_args([f"model.weights={ckpt}", "track.group=mine"])[0], "probe") == "mine"
    assert run_group(parse_args(["model.weights=none"])[0], "probe") == "probe"
