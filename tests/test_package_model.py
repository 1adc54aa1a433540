"""eval/package_model.py: the model card describes the history the packaged model actually reads."""

from pathlib import Path

import pytest

from eval import package_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("label_history, says, never", [
    (False, "writes no labels into the history", "label this model predicted"),
    (True, "label this model predicted for it", "writes no labels"),
])
def test_use_section_follows_the_models_history(label_history, says, never):
    text = package_model.usage(label_history)
    assert says in text and never not in text
    assert "{history}" not in text and "{label}" in text  # the template placeholder is filled; the prompt's is kept
