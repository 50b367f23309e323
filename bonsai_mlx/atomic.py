"""Write files and directories so that a crash never leaves a half-written one: a temporary name beside the target,
then `os.replace` (atomic within one filesystem). The one helper for every writer; framework-free (the teacher tool
uses it too)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union


class atomic_dir:
    """Write a directory under a temporary name next to `target`, rename it into place on success.

    A crash never leaves a half-written directory at `target`; an existing `target` is replaced only at the end.
    """

    def __init__(self, target: Union[str, Path]):
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        return False


@contextmanager
def atomic_file(target: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write; it replaces `target` when the block ends without error."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(target: Union[str, Path], text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def write_json(target: Union[str, Path], obj, indent: int = 1) -> None:
    write_text(target, json.dumps(obj, indent=indent) + "\n")
