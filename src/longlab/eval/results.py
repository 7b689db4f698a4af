"""``results.jsonl`` and the folder that holds it: one configuration per folder, every row keyed by
the fingerprint of what produced it, torn lines dropped, one ``longlab eval`` at a time.

A row's *fingerprint* is a digest of everything that changes its result: the model (its path and a
digest of its configuration and weights), the tokenizer (a digest of its files, chat templates
included), the dtype, the seed, whether prompts are wrapped in the chat template, the longlab
version (together: the run's *identity*, :data:`IDENTITY_FIELDS`, stored in every row as well) and
the cell -- the method in canonical form, the task with its parameters, and the length. A resume
skips exactly the samples whose fingerprint and index are present; a folder holding rows of another
identity, or rows from before fingerprints, is refused with a message naming what differs.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from longlab.errors import LonglabError
from longlab.loading import BUNDLED, tokenizer_files, weight_files

RESULTS = "results.jsonl"
LOCK = ".longlab.lock"
OWNER = ".longlab.owner.json"  # who holds the lock: pid, host, start time, command
EDGE = 2**20  # bytes read from each end of a weight file for its digest


def warn(message: str) -> None:
    print(f"longlab: warning: {message}", file=sys.stderr, flush=True)


# -- identity ---------------------------------------------------------------------------------------


def _sha(*parts: bytes) -> hashlib._Hash:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest


def weights_digest(folder: Path) -> str:
    """Digest of a checkpoint: config.json, generation_config.json and shard indexes in full, and of
    each weight file its name, size and first and last MiB -- a few MiB read for a 16 GB model."""
    digest = hashlib.sha256()
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        digest.update(_sha(name.encode(), path.read_bytes() if path.is_file() else b"").digest())
    for path in sorted(folder.glob("*.index.json")):
        digest.update(_sha(path.name.encode(), path.read_bytes()).digest())
    for path in weight_files(folder):
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(EDGE)
            f.seek(max(0, size - EDGE))
            tail = f.read(EDGE)
        digest.update(_sha(path.name.encode(), str(size).encode(), head, tail).digest())
    return digest.hexdigest()[:16]


def tokenizer_digest(folder: Path) -> str:
    """Digest of every tokenizer file (vocabulary, merges, configuration, chat templates), in full."""
    digest = hashlib.sha256()
    for path in tokenizer_files(folder):
        digest.update(_sha(str(path.relative_to(folder)).encode(), path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def longlab_version() -> str:
    """The installed longlab's version (read from its metadata: the package root is a layer above)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longlab")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class Identity:
    """What every row of one results folder shares (stored in each row under these names)."""

    model: str  # a bundled model's name, or the checkpoint folder's absolute path
    model_digest: str
    tokenizer_digest: str
    dtype: str
    seed: int
    chat: bool
    longlab: str

    @classmethod
    def of(cls, model: str, folder: Path, dtype: str, seed: int, chat: bool) -> Identity:
        name = model if model in BUNDLED else str(Path(folder).resolve())
        return cls(name, weights_digest(folder), tokenizer_digest(folder), dtype, seed, chat, longlab_version())

    def fields(self) -> dict:
        return asdict(self)

    def fingerprint(self, method: str, task: str, length: int) -> str:
        """The cell's fingerprint: this identity, the method in canonical form, the task's identity
        spec (name and the parameters that change a result) and the length."""
        cell = {**self.fields(), "method": method, "task": task, "length": length}
        return hashlib.sha256(json.dumps(cell, sort_keys=True).encode()).hexdigest()[:16]


IDENTITY_FIELDS = tuple(Identity.__dataclass_fields__)
HINTS = {"dtype": "--dtype {}", "seed": "--seed {}", "model": "--model {}"}


def _differences(row: dict, identity: Identity) -> list[str]:
    here = identity.fields()
    out = []
    for name in IDENTITY_FIELDS:
        if row.get(name) != here[name]:
            there = row.get(name)
            hint = f" (resume with {HINTS[name].format(there)})" if name in HINTS and there is not None else ""
            if name == "chat":
                hint = " (resume with --chat)" if there else " (resume without --chat)"
            out.append(f"{name}: {there!r} there, {here[name]!r} here{hint}")
    return out


# -- reading and writing ----------------------------------------------------------------------------


def read_rows(folder: Path, quiet: bool = False) -> list[dict]:
    """Every whole row of ``folder/results.jsonl``, in file order. A line that is not a whole JSON
    object -- the torn end of a write cut short by a full disk or a kill -- is dropped with a warning."""
    path = Path(folder) / RESULTS
    if not path.exists():
        return []
    with path.open("rb") as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # never half a line another process is appending
        data = f.read()
    rows, torn = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            torn += 1
            continue
        if isinstance(row, dict) and {"method", "task", "length", "sample"} <= set(row):
            rows.append(row)
        else:
            torn += 1
    if torn and not quiet:
        warn(f"{path}: dropped {torn} torn line(s) (a write cut short); their samples count as not measured")
    return rows


def repair(folder: Path) -> None:
    """Cut a torn last line (no newline at the end) off ``results.jsonl``, so the next row does not
    join it; done by the writer before it reads."""
    path = Path(folder) / RESULTS
    if not path.exists():
        return
    with path.open("r+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            warn(f"{path}: dropped a torn last line ({len(data) - keep} bytes, a write cut short); "
                 "its sample will be measured again")  # fmt: skip


def row_key(row: dict) -> tuple:
    """A row's identity for de-duplication: its fingerprint (or, in rows from before fingerprints,
    its method, task and length) and its sample index."""
    cell = row.get("fingerprint") or (row["method"], row["task"], row["length"])
    return cell, row["sample"]


class Results:
    """``results.jsonl`` of one folder and one :class:`Identity`: refuses rows of another identity,
    knows which (fingerprint, sample) pairs are done, appends rows."""

    def __init__(self, folder: Path, identity: Identity, quiet: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / RESULTS
        self.identity = identity
        rows = read_rows(self.folder, quiet=quiet)
        old = [r for r in rows if "fingerprint" not in r]
        if old:
            raise LonglabError(
                f"{self.path} holds {len(old)} row(s) written before longlab recorded each result's configuration, "
                f"so they cannot be matched to this run; write to a fresh --out (`longlab report {self.folder}` "
                "still reads them)"
            )
        for row in rows:
            differences = _differences(row, identity)
            if differences:
                raise LonglabError(
                    f"{self.folder} holds results of another configuration -- {'; '.join(differences)}. A results "
                    "folder holds one configuration (model, tokenizer, dtype, seed, chat template, longlab version): "
                    "rerun with the folder's settings to resume it, or use a fresh --out"
                )
        self.done: set[tuple] = {row_key(r) for r in rows}
        self.cells: dict[tuple, str] = {(r["method"], r["task"], r["length"]): r["fingerprint"] for r in rows}

    def check_cell(self, method: str, label: str, length: int, fingerprint: str) -> None:
        """Refuse a cell whose label the folder already holds from another task configuration (a jsonl
        file of the same name elsewhere, or edited since): its rows would be summarised as one."""
        earlier = self.cells.get((method, label, length), fingerprint)
        if earlier != fingerprint:
            raise LonglabError(
                f"{self.folder} holds {label!r} results (method {method!r}, length {length}) of another task "
                "configuration (another file of that name, or the file changed since); use a fresh --out"
            )

    def fingerprint(self, method: str, task: str, length: int) -> str:
        return self.identity.fingerprint(method, task, length)

    def is_done(self, fingerprint: str, sample: int) -> bool:
        return (fingerprint, sample) in self.done

    def append(self, row: dict) -> None:
        line = strict_json(row) + "\n"  # a NaN loss is written as null
        with self.path.open("a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # other processes of a torchrun evaluation append too
            end = f.seek(0, os.SEEK_END)
            if end:  # never join a torn last line
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
            fcntl.flock(f, fcntl.LOCK_UN)
        self.done.add(row_key(row))


def _finite(value) -> bool:
    if isinstance(value, float):
        return value == value and value not in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _nan_to_null(value):
    """NaN and infinities as None (JSON null), everywhere in a structure of dicts and lists."""
    if isinstance(value, float):
        return value if _finite(value) else None
    if isinstance(value, dict):
        return {k: _nan_to_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_null(v) for v in value]
    return value


def strict_json(value, **kwargs) -> str:
    """JSON that every parser reads: NaN and infinities become null."""
    return json.dumps(_nan_to_null(value), allow_nan=False, **kwargs)


# -- the folder -------------------------------------------------------------------------------------


def prepare_folder(out: str | Path) -> Path:
    """The output folder, created if needed; a clear error when it is a file or cannot be written."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise LonglabError(f"--out {str(out)!r} is a file; give a folder (a new one, or one from an earlier run)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise LonglabError(f"--out {str(out)!r} cannot be created: {error.strerror or error}") from None
    probe = folder / f".longlab.probe.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise LonglabError(f"--out {str(out)!r} is not writable: {error.strerror or error}") from None
    results = folder / RESULTS
    if results.exists() and not os.access(results, os.W_OK):
        raise LonglabError(f"{results} is not writable")
    return folder


class FolderLock:
    """One ``longlab eval`` per folder: an exclusive lock on ``.longlab.lock`` (the ``filelock``
    library), taken without waiting; the holder's pid, host and start time are written beside it so
    a second run can say who holds it. Released on exit, also on an error or Ctrl-C; the operating
    system releases it if the process dies."""

    def __init__(self, folder: Path):
        from filelock import FileLock

        self.folder = Path(folder)
        self.lock = FileLock(str(self.folder / LOCK), timeout=0)
        self.owner = self.folder / OWNER

    def __enter__(self) -> FolderLock:
        from filelock import Timeout

        try:
            self.lock.acquire()
        except Timeout:
            raise LonglabError(
                f"{self.folder} is in use by another longlab eval ({self._holder()}); wait for it to finish, "
                "or use another --out"
            ) from None
        except OSError as error:
            raise LonglabError(f"cannot lock {self.folder / LOCK}: {error.strerror or error}") from None
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": sys.argv}
        self.owner.write_text(json.dumps(record) + "\n")
        return self

    def _holder(self) -> str:
        try:
            record = json.loads(self.owner.read_text())
            return f"pid {record['pid']} on {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError):
            return "a process that has not yet written its pid"

    def __exit__(self, *exc) -> None:
        self.owner.unlink(missing_ok=True)
        self.lock.release()
