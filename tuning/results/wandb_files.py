"""A reader of the run files Weights & Biases (wandb 0.31) writes, which wandb itself cannot read back in Python:
how --wandb finds what a run already holds after a crash, and how the tests read the offline runs.

`wandb.init(mode="offline", dir=D, id=I, ...)` writes `D/wandb/offline-run-<YYYYmmdd_HHMMSS>-<I>/run-<I>.wandb` (a
"-1", "-2", ... suffix on the folder where the same id starts twice in one second; `D/wandb/latest-run` links to the
last one). The file is a 7-byte header (b":W&B", 0xBEE1 little-endian, version 0), then the LevelDB log format:
32 KiB blocks, each chunk behind a 7-byte header (plain zlib CRC-32 of the type byte and the data, not masked crc32c;
length, 2 bytes; type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4), a block's tail under 7 bytes zero padding. The records are
serialized `wandb.proto.wandb_internal_pb2.Record` messages; wandb itself has no Python reader of them.

wandb's Go writer buffers the file: until the run finishes it may hold the header only (a SIGKILLed run keeps nothing),
and `run.finish()` returns a few milliseconds before the rest is on disk: pass `wait_s`, or call `wandb.teardown()`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32, length, type
_AUTOMATIC = {"_wandb", "_runtime", "_timestamp"}  # keys wandb adds by itself ("_step" is kept)


@dataclass
class OfflineRun:
    """What one offline run file holds. A run resumed by id in offline mode is a second file with only what came after
    (no name, group or config of the first, and its history starting at _step 0 again)."""

    id: str  # from the file name where the file holds no run record yet
    name: str  # the display name; "" where wandb.init got none (offline mode makes up no name)
    group: str
    project: str  # "uncategorized" where wandb.init got none
    job_type: str
    tags: list[str]
    config: dict[str, Any]  # values JSON-decoded, wandb's own "_wandb" key left out
    history: list[dict[str, Any]]  # one dict per step, keys as logged (nested dicts flattened to "a.b") plus "_step"
    summary: dict[str, Any]  # the last values, merged over the updates, "_step" kept, "_runtime" etc. left out
    exit_code: int | None  # from the exit record; None where the run never finished (or is not flushed yet)
    path: Path  # the .wandb file
    start_time: float = 0.0  # seconds since the epoch, from the run record; orders the runs


def _records(path: Path) -> list[pb.Record]:
    """The records of one .wandb file, in order, up to the end of what was written (a torn chunk ends it)."""
    data = path.read_bytes()
    if data[: _FILE_HEADER.size] != _FILE_HEADER.pack(b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a wandb 0.31 run file (header {data[:7]!r})")
    records, pending, pos = [], b"", _FILE_HEADER.size
    while pos + _CHUNK_HEADER.size <= len(data):
        if _BLOCK - pos % _BLOCK < _CHUNK_HEADER.size:  # a block's padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        chunk = data[pos + _CHUNK_HEADER.size : pos + _CHUNK_HEADER.size + length]
        if not 1 <= kind <= 4 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        pos += _CHUNK_HEADER.size + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            records.append(pb.Record.FromString(pending))
    return records


def _key(item: pb.HistoryItem | pb.SummaryItem | pb.ConfigItem) -> list[str]:
    return list(item.nested_key) or [item.key]


def read_run(path: Path) -> OfflineRun:
    """Read one run-<id>.wandb file."""
    path = Path(path)
    run = OfflineRun(path.stem.removeprefix("run-"), "", "", "", "", [], {}, [], {}, None, path)
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            if kind == "run":
                r = record.run
                run.id, run.name, run.group, run.project = r.run_id, r.display_name, r.run_group, r.project
                run.job_type, run.tags, run.start_time = r.job_type, list(r.tags), r.start_time.ToNanoseconds() / 1e9
            config = record.run.config if kind == "run" else record.config
            for item in config.remove:
                run.config.pop(".".join(_key(item)), None)
            for item in config.update:
                if _key(item) != ["_wandb"]:
                    run.config[".".join(_key(item))] = json.loads(item.value_json)
        elif kind == "history":
            row = {".".join(_key(i)): json.loads(i.value_json) for i in record.history.item}
            run.history.append({k: v for k, v in row.items() if k not in _AUTOMATIC})
        elif kind == "summary":
            for item in record.summary.update:
                *parents, last = _key(item)
                if (parents or [last])[0] not in _AUTOMATIC:
                    target = run.summary
                    for k in parents:
                        target = target.setdefault(k, {})
                    target[last] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_key(item)[0], None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(root: Path, *, wait_s: float = 0.0) -> list[OfflineRun]:
    """Every offline run under root (searched recursively for run-*.wandb), in the order written.

    The order is the run records' start time, then the path: a run resumed by id comes after the run it resumes, as
    a separate OfflineRun with the same id. wait_s: wait up to that long for every run to hold its exit record.
    """
    deadline = time.monotonic() + wait_s
    while True:
        paths = [p for p in Path(root).rglob("run-*.wandb") if "latest-run" not in p.parts]
        runs = sorted((read_run(p) for p in paths), key=lambda r: (r.start_time, str(r.path)))
        if time.monotonic() >= deadline or all(r.exit_code is not None for r in runs):
            return runs
        time.sleep(0.01)
