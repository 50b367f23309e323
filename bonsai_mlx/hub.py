"""Resolving a model reference (local directory or Hugging Face hub id) to a local directory.

Downloads go through huggingface_hub (it honours HF_HOME, HF_HUB_OFFLINE and its cache). When a repo cannot be
fetched, the user gets one line naming the repo and how to get it, never a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from .errors import BonsaiError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer.model", "*.tiktoken"]


def resolve(path_or_repo: str, allow_patterns: Optional[List[str]] = None, what: str = "model") -> Path:
    """Return a local directory for `path_or_repo`, downloading a hub snapshot if it is not a local path."""
    p = Path(path_or_repo).expanduser()
    if p.exists():
        if not p.is_dir():
            raise BonsaiError(f"{what} path {p} is a file; pass the checkpoint directory that holds config.json")
        return p
    looks_local = path_or_repo.startswith((".", "/", "~")) or path_or_repo.count("/") != 1
    if looks_local:
        raise BonsaiError(f"{what} {path_or_repo!r} not found: no such directory, and it is not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_repo, allow_patterns=allow_patterns or WEIGHT_PATTERNS))
    except Exception as e:  # huggingface_hub raises many types (offline, 404, gated, connection)
        reason = type(e).__name__
        raise BonsaiError(
            f"could not fetch {what} {path_or_repo!r} from the Hugging Face hub ({reason}). "
            f"On a machine with internet run `huggingface-cli download {path_or_repo}` (or `hf download {path_or_repo}`) "
            f"and copy the cache, or pass a local directory."
        ) from e
