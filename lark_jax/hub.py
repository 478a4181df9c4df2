"""The Hugging Face Hub cache: resolving a repository to local files, offline when told.

``huggingface_hub`` reads ``HF_HOME`` / ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` once, when
it is imported; lark-jax reads them at each call, so that a process (or a test) that sets
them later is obeyed. Only the files named by ``patterns`` are fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from lark_jax.errors import LarkError


def hub_environment() -> tuple[str | None, bool]:
    """(cache directory, offline) from HF_HUB_CACHE / HF_HOME / HF_HUB_OFFLINE as they are
    now (None: huggingface_hub's default cache)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or (str(Path(env["HF_HOME"]) / "hub")
                                        if env.get("HF_HOME") else None)
    offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return cache, offline


def snapshot(repo: str, *, repo_type: str, revision: str | None, patterns: list[str],
             where: str) -> Path:
    """The local snapshot of ``repo`` holding the files matching ``patterns`` (downloaded
    into the cache unless offline); one LarkError when it cannot be had."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache_dir, offline = hub_environment()
    try:
        return Path(snapshot_download(repo, repo_type=repo_type, revision=revision,
                                      allow_patterns=patterns, cache_dir=cache_dir,
                                      local_files_only=offline))
    except LocalEntryNotFoundError:
        fetch = "hf download" + (" --repo-type dataset" if repo_type == "dataset" else "")
        raise LarkError(f"this Hub {repo_type} is not in the local Hugging Face cache and it "
                        "cannot be downloaded here (no network, or HF_HUB_OFFLINE=1); fetch "
                        f"it where there is network (`{fetch} {repo}`) and point HF_HOME at "
                        "that cache", where=where) from None
    except (HFValidationError, OSError, ValueError) as e:
        raise LarkError(f"cannot resolve this Hub {repo_type} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})", where=where) from None


__all__ = ["hub_environment", "snapshot"]
