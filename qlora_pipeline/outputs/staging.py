"""Folders that appear whole or not at all: a stage writes into a hidden folder beside the target and renames it into
place only once everything in it is written and checked (the merged export, the GGUF files)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from qlora_pipeline.errors import PipelineError, first_line


@contextlib.contextmanager
def staged_folder(target: Path, stage: str):
    """A hidden folder beside `target` to write into. When the block ends without an error it is renamed into place
    (`_install`); otherwise it is removed, so an interrupted or failed stage never leaves a folder that looks
    complete. A full disk, a quota or a read-only folder ends it in one line naming `stage`."""
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
        _install(staging, target)
    except (OSError, SafetensorError) as exc:
        raise PipelineError(
            f"{stage}: could not write the export {target}: {describe_os_error(exc)}; nothing was exported"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once installed


def _install(staging: Path, target: Path) -> None:
    """Rename the finished staging folder into place (an existing folder is replaced only after that)."""
    if target.exists():
        retired = target.parent / f".{target.name}.replaced-{os.getpid()}"
        target.rename(retired)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(target)


def describe_os_error(exc: Exception) -> str:
    """'File too large (path)' from an OSError; a short write and safetensors' own I/O error (not an OSError) as they
    are worded."""
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno is None:  # numpy's tofile reports a short write without the system's reason
            return f"{exc}{where}: a short write (a full disk, a quota or a file-size limit)"
        return f"{exc.strerror or exc}{where}"
    return first_line(exc)
