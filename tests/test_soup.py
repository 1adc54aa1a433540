"""eval/soup.py: the weight-averaged adapter of several runs is a run folder whose update is the members' mean."""

import json
from pathlib import Path

import pytest
import torch

from erc_llm.run import RunSpec, load
from eval import soup as soup_script
from tests.conftest import write_lora_run


def tiny_run(tmp_path: Path, tiny_model, tiny_model_dir, seed: int, label_history: bool = False) -> Path:
    return write_lora_run(tmp_path / f"run{seed}_{label_history}", tiny_model, tiny_model_dir, seed, label_history)


def merged_q(run: Path):
    return load(run).model.model.layers[0].self_attn.q_proj.weight.detach().clone()


def test_exact_soup_is_the_mean_of_the_members_updates(tmp_path, tiny_model, tiny_model_dir):
    runs = [tiny_run(tmp_path, tiny_model, tiny_model_dir, s) for s in (0, 1, 2)]
    out = soup_script.soup(runs, tmp_path / "soup", rank=0)
    expected = torch.stack([merged_q(r) for r in runs]).mean(0)
    assert torch.allclose(merged_q(out), expected, atol=1e-5)
    assert not torch.allclose(merged_q(runs[0]), expected, atol=1e-3)  # the members really differ
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 12
    assert RunSpec.read(out) == RunSpec.read(runs[0])
    assert json.loads((out / "soup.json").read_text())["members"] == [str(r) for r in runs]


def test_truncated_soup_has_the_requested_rank_and_approximates_the_mean(tmp_path, tiny_model, tiny_model_dir):
    runs = [tiny_run(tmp_path, tiny_model, tiny_model_dir, s) for s in (0, 1)]
    out = soup_script.soup(runs, tmp_path / "soup4", rank=4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base = load(None, model=str(tiny_model_dir)).model.model.layers[0].self_attn.q_proj.weight
    mean_update = torch.stack([merged_q(r) for r in runs]).mean(0) - base
    soup_update = merged_q(out) - base
    rel = (soup_update - mean_update).norm() / mean_update.norm()
    assert rel < 0.8  # rank 4 of a rank-8 mean keeps most of it
    assert torch.linalg.matrix_rank(soup_update, atol=1e-5) <= 4


def test_runs_of_different_recipes_are_refused(tmp_path, tiny_model, tiny_model_dir):
    a = tiny_run(tmp_path, tiny_model, tiny_model_dir, 0)
    b = tiny_run(tmp_path, tiny_model, tiny_model_dir, 1, label_history=True)
    with pytest.raises(SystemExit, match=r"differs from .* in label_history"):
        soup_script.soup([a, b], tmp_path / "soup", rank=0)
    assert not (tmp_path / "soup").exists()
