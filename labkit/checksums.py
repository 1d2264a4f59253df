"""SHA-256 checksums of a model directory, written once and checked before the model is used.

A model that is silently damaged (a truncated copy, a disk error, an edit by mistake) does not crash:
it just gives worse numbers, and every lesson built on it is wrong. So a provisioned model directory
carries a `SHA256SUMS` file in the format of coreutils (`sha256sum -c SHA256SUMS` checks it by hand
too), and labkit compares every file against it before loading.

Hashing 540 MB takes a few seconds on a laptop CPU, too long to pay on every load; so a successful check
is remembered in `.verified` with each file's size and modification time, and a file is hashed again as
soon as either changes (any write to it does).
"""

import hashlib
import json
from pathlib import Path

SUMS = "SHA256SUMS"
VERIFIED = ".verified"


class ChecksumError(ValueError):
    """A file of a model directory is missing or does not match its recorded SHA-256."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_checksums(directory: Path, names: list[str]) -> Path:
    """Record the SHA-256 of each named file of `directory` in directory/SHA256SUMS."""
    directory = Path(directory)
    lines = [f"{sha256_file(directory / name)}  {name}\n" for name in sorted(names)]
    (directory / SUMS).write_text("".join(lines))
    return directory / SUMS


def read_checksums(directory: Path) -> dict[str, str]:
    """{file name: sha256 hex} from directory/SHA256SUMS."""
    sums = {}
    for line in (Path(directory) / SUMS).read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest
    return sums


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def verify_checksums(directory: Path, fix_hint: str) -> None:
    """Raise ChecksumError (saying `fix_hint`) if a file listed in SHA256SUMS is missing or differs."""
    directory = Path(directory)
    stamp = directory / VERIFIED
    seen = json.loads(stamp.read_text()) if stamp.exists() else {}
    checked = {}
    for name, digest in read_checksums(directory).items():
        path = directory / name
        if not path.is_file():
            raise ChecksumError(f"{path} is missing. {fix_hint}")
        if seen.get(name) == _fingerprint(path):
            checked[name] = seen[name]  # unchanged since it last matched
            continue
        if sha256_file(path) != digest:
            raise ChecksumError(
                f"{path} is corrupt: its SHA-256 does not match {directory / SUMS}. {fix_hint}"
            )
        checked[name] = _fingerprint(path)
    if checked != seen:
        try:
            stamp.write_text(json.dumps(checked))
        except OSError:  # a read-only copy: it is hashed again next time, nothing worse
            pass
