import json
import os

import pytest

from erc_llm.backbone import ModelNotFound, prepare_model


def test_unknown_model_lists_available():
    with pytest.raises(ModelNotFound, match=r"model 'gpt-5' not found; available models = \['gemma-3-270m', 'smollm2-135m-instruct', 'qwen2.5-coder-0.5b'\]"):
        prepare_model("gpt-5")


def test_local_dir_and_hub_id(tmp_path, tiny_model_dir):
    path, manifest = prepare_model(str(tiny_model_dir))
    assert path == str(tiny_model_dir) and "source" in manifest
    with pytest.raises(ModelNotFound, match="no config.json"):
        prepare_model(str(tmp_path))
    assert prepare_model("google/gemma-3-270m-it") == ("google/gemma-3-270m-it", {"source": "hub:google/gemma-3-270m-it"})


def test_half_written_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    """A cache dir without manifest (killed conversion) triggers a fresh conversion."""
    import erc_llm.backbone as bb

    broken = tmp_path / "models" / "gemma-3-270m"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    converted = []

    def fake_convert(name, spec, target):
        converted.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").write_text("{}")
        manifest = {"name": name, "files": {"config.json": {"bytes": 2, "sha256": "x"}}}
        (target / "manifest.json").write_text(json.dumps(manifest))
        return manifest

    monkeypatch.setattr(bb, "_convert", fake_convert)
    path, manifest = prepare_model("gemma-3-270m", tmp_path)
    assert converted == [broken] and manifest["name"] == "gemma-3-270m"
    prepare_model("gemma-3-270m", tmp_path)
    assert len(converted) == 1  # second call uses the now-complete cache


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    from erc_llm.io import atomic_dir

    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "final") as d:
            (d / "weights").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_whole_versions(tmp_path):
    from erc_llm.io import atomic_dir

    for v in ("one", "two"):
        with atomic_dir(tmp_path / "final") as d:
            (d / "f").write_text(v)
    assert (tmp_path / "final" / "f").read_text() == "two"
    assert (tmp_path / "final").is_symlink()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".final.")]) == 1  # old version removed


def test_a_damaged_safetensors_header_is_a_clear_error_naming_the_rebuild(tmp_path, tiny_model_dir):
    import shutil

    from erc_llm.backbone import ModelNotFound, load_backbone

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:20] = b"\x00garbage!!\x00\x00"  # same size, header no longer JSON
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelNotFound, match="cannot be read .*prepare-model"):
        load_backbone(str(copy))


def test_bf16_copy_holds_the_same_bits_as_casting_on_load_and_is_written_once(tmp_path, tiny_model_dir):
    """Loading bfloat16 from the cached copy gives the weights a float32 load cast to bfloat16 gives (so results do
    not depend on which one ran); the copy carries checksums and is not rewritten."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from erc_llm.backbone import bf16_copy, read_manifest, verify_cache

    src = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, src)
    copy = bf16_copy(src)
    assert copy == tmp_path / "tiny.bfloat16" and read_manifest(copy)["dtype"] == "bfloat16"
    verify_cache(copy, read_manifest(copy))
    cast = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.bfloat16).state_dict()
    assert cast.keys() == loaded.keys()
    for k in cast:
        assert loaded[k].dtype == torch.bfloat16 and torch.equal(cast[k], loaded[k]), k
    stamp = (copy / "model.safetensors").stat().st_mtime_ns
    assert bf16_copy(src) == copy and (copy / "model.safetensors").stat().st_mtime_ns == stamp


def test_auto_dtype_follows_the_cpu(monkeypatch):
    import erc_llm.backbone as backbone

    monkeypatch.setattr(backbone, "native_bf16_cpu", lambda: "amx_bf16")
    assert backbone.resolve_dtype("auto") == "bfloat16" and backbone.resolve_dtype("float32") == "float32"
    monkeypatch.setattr(backbone, "native_bf16_cpu", lambda: None)
    assert backbone.resolve_dtype("auto") == "float32"


def test_inference_loading_bounds_onednn_primitive_cache_unless_the_user_set_it(tiny_model_dir, monkeypatch):
    """Decoding changes the token count every step; oneDNN's default cache of one bf16 primitive per shape then
    grows into the peak memory. Loading for inference sets a small capacity for the process, and keeps a value the
    user set; loading for training keeps oneDNN's default (a training step uses more shapes than 16)."""
    from erc_llm.backbone import ONEDNN_CACHE_CAPACITY, load_backbone, load_for_training

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    load_for_training(str(tiny_model_dir))
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ
    load_backbone(str(tiny_model_dir))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    load_backbone(str(tiny_model_dir))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"
