"""`moeify.json`: every output folder records how it was made.

One file per output, holding one record per stage that produced it, in order (split, finetune,
quantize, ...). A stage copies the records of its input and adds its own, so the final folder tells
the whole story: the model card, `inspect` and `run`'s resume logic all read it from here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from moeify import __version__

METADATA_NAME = "moeify.json"


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The folder's moeify.json, or an empty record for checkpoints moeify did not make."""
    path = Path(folder) / METADATA_NAME
    if not path.is_file():
        return {"stages": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {"stages": {}}
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return {"stages": {}}
    return data


def write_metadata(folder: str | Path, stage: str, record: dict[str, Any], previous: dict[str, Any] | None = None,
                   **top_level: Any) -> dict[str, Any]:
    """Write moeify.json into `folder`: the input's stage records plus this stage's `record`."""
    stages = dict((previous or {}).get("stages", {}))
    stages.pop(stage, None)  # a re-run of a stage replaces its old record, and moves it last
    stages[stage] = {"moeify_version": __version__, "complete": True, **record}
    data = {**{k: v for k, v in (previous or {}).items() if k != "stages"}, **top_level,
            "moeify_version": __version__, "last_stage": stage, "stages": stages}
    replace_metadata(folder, data)
    return data


def replace_metadata(folder: str | Path, data: dict[str, Any]) -> None:
    """Write `data` as the folder's moeify.json, atomically (the pipeline stamps finished stages with it)."""
    _write_atomically(Path(folder) / METADATA_NAME, json.dumps(data, indent=2, default=str) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """Write beside, then rename: a kill mid-write must not truncate a history that read_metadata would drop."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def config_hash(config: dict[str, Any]) -> str:
    """A stable short hash of a config.json, to tell later which source a conversion came from."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "machine": platform.machine(), "cpus": _cpu_count()}
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
