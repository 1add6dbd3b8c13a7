"""Whether W&B logs online or offline, decided before the tracker starts: an API key (environment or
netrc) and a server that answers within seconds, else offline (``wandb sync`` uploads the run later); a
run never waits on a network."""

from __future__ import annotations

import logging
import netrc
import os
from urllib.parse import urlparse

from .models import reachable

log = logging.getLogger(__name__)


def wandb_key() -> str | None:
    import wandb

    key = os.environ.get("WANDB_API_KEY")
    if key:
        return key
    host = urlparse(wandb.Settings().base_url).hostname or ""
    try:
        return (netrc.netrc().authenticators(host) or (None, None, None))[2]
    except (OSError, netrc.NetrcParseError):
        return None


def wandb_can_go_online() -> bool:
    """An API key (env or netrc) and the W&B server answering a TCP connect within 3 s."""
    import wandb

    url = urlparse(wandb.Settings().base_url)
    host = url.hostname or ""
    if not wandb_key():
        return False
    if reachable(url.geturl()):
        return True
    log.warning("W&B key found but %s is unreachable: logging offline", host)
    return False


def set_wandb_mode(mode: str) -> None:
    if mode == "auto":
        if "WANDB_MODE" in os.environ:
            return  # the user's own choice
        mode = "online" if wandb_can_go_online() else "offline"
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "30")  # seconds: a key without a network must not hang a run
