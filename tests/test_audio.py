"""Audio feature sources on real speech (EmoDB), precomputed files, and bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from erc_llm.audio import (
    PROSODY_FEATURES,
    extract_dir,
    load_feature_csv,
    load_npy_dir,
    load_source,
    praat_prosody,
    read_wav,
)
from erc_llm.data.schema import DataError
from tests.conftest import SHARED

EMODB = SHARED / "emodb"
needs_emodb = pytest.mark.skipif(not (EMODB / "wav").is_dir(), reason=f"EmoDB not present at {EMODB}")
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def wavs(tmp_path):
    """Three real EmoDB clips: angry, neutral, sad (speaker 03)."""
    d = tmp_path / "wav"
    d.mkdir()
    for name in ("03a01Wa.wav", "03a01Nc.wav", "03a02Ta.wav"):
        shutil.copy(EMODB / "wav" / name, d / name)
    return d


@needs_emodb
def test_read_wav_resamples_to_16k():
    a = read_wav(EMODB / "wav" / "03a01Wa.wav")
    assert a.dtype == np.float32 and a.ndim == 1
    assert len(a) == 32_000  # the clips are exactly 2.0 s at 22,050 Hz


@needs_emodb
def test_praat_prosody_on_real_speech_is_plausible():
    v = praat_prosody(read_wav(EMODB / "wav" / "03a01Wa.wav"))
    f = dict(zip(PROSODY_FEATURES, v))
    assert f["duration"] == pytest.approx(2.0)
    assert 75 <= f["avg_pitch"] <= 600 and f["pitch_range"] > 0
    assert 30 < f["avg_intensity"] < 100 and 0 < f["articulation_rate"] < 15
    # an angry male voice is higher and louder than the same speaker's neutral reading
    n = dict(zip(PROSODY_FEATURES, praat_prosody(read_wav(EMODB / "wav" / "03a01Nc.wav"))))
    assert f["avg_pitch"] > n["avg_pitch"]


@needs_emodb
def test_extract_praat_and_egemaps_write_csv_tables(wavs, tmp_path):
    r = extract_dir("praat", wavs, tmp_path / "praat")
    assert r["extracted"] == 3 and r["failed"] == {}
    t = load_feature_csv(tmp_path / "praat" / "features.csv")
    assert t.names == PROSODY_FEATURES and set(t.values) == {"03a01Wa", "03a01Nc", "03a02Ta"}
    r = extract_dir("egemaps", wavs, tmp_path / "eg")
    t = load_source("csv", tmp_path / "eg", "train")
    assert len(t.names) == 88 and "F0semitoneFrom27.5Hz_sma3nz_amean" in t.names
    assert not any(np.isnan(v).any() for v in t.values.values())


@needs_emodb
def test_bad_audio_is_skipped_and_reported_and_extraction_resumes(wavs, tmp_path):
    (wavs / "broken.wav").write_bytes(b"RIFF not really a wav")
    import soundfile as sf

    sf.write(wavs / "empty.wav", np.zeros(0, np.float32), 16000)
    out = tmp_path / "p"
    r = extract_dir("praat", wavs, out)
    assert r["extracted"] == 3 and set(r["failed"]) == {"broken", "empty"}
    assert "cannot read audio" in r["failed"]["broken"] and "empty audio" in r["failed"]["empty"]
    assert json.loads((out / "report.json").read_text())["failed"] == r["failed"]
    # resume: a partial file from an interrupted run is picked up and finished (rows of the same audio bytes only)
    digest = json.loads((out / "sources.json").read_text())["03a01Wa"]
    (out / ".features.partial.jsonl").write_text(json.dumps({"id": "03a01Wa", "v": [1.0] * 8, "d": digest}) + "\n"
                                                 + json.dumps({"id": "03a01Nc", "v": [1.0] * 8, "d": "stale"}) + "\n{torn")
    extract_dir("praat", wavs, out)
    table = load_feature_csv(out / "features.csv").values
    assert table["03a01Wa"].tolist() == [1.0] * 8 and table["03a01Nc"].tolist() != [1.0] * 8
    # a file whose bytes changed is extracted again, not served from the cache
    import shutil

    shutil.copy(wavs / "03a02Ta.wav", wavs / "03a01Wa.wav")
    extract_dir("praat", wavs, out)
    table = load_feature_csv(out / "features.csv").values
    assert np.allclose(table["03a01Wa"], table["03a02Ta"], equal_nan=True)


@needs_emodb
def test_emotion2vec_extraction_with_a_random_init_model(wavs, tmp_path):
    """The real FunASR extraction path over real speech, with a tiny randomly initialised emotion2vec."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("funasr")
    import yaml
    from funasr.models.emotion2vec.model import Emotion2vec

    model_dir = tmp_path / "e2v"
    model_dir.mkdir()
    shutil.copy(FIXTURES / "emotion2vec_tiny.yaml", model_dir / "config.yaml")
    torch.manual_seed(0)
    torch.save(Emotion2vec(**yaml.safe_load((model_dir / "config.yaml").read_text())).state_dict(), model_dir / "model.pt")
    r = extract_dir("emotion2vec", wavs, tmp_path / "utt", model=str(model_dir))
    t = load_source("csv", tmp_path / "utt", "test")
    assert r["extracted"] == 3 and len(t.names) == 32
    r = extract_dir("emotion2vec", wavs, tmp_path / "frames", model=str(model_dir), granularity="frame")
    t = load_npy_dir(tmp_path / "frames")
    assert t.values["03a01Wa"].shape == (99, 32)  # 2 s at 50 Hz
    # the utterance vector is the mean of the frames
    np.testing.assert_allclose(load_source("csv", tmp_path / "utt", "x").values["03a01Wa"],
                               t.values["03a01Wa"].mean(axis=0), rtol=1e-4, atol=1e-5)


def test_missing_emotion2vec_model_files_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("model: Emotion2vec\n")
    from erc_llm.audio import check_emotion2vec_dir

    with pytest.raises(DataError, match=r"missing \['model.pt'\]"):
        check_emotion2vec_dir(str(tmp_path / "m"))
    with pytest.raises(DataError, match="no such directory"):
        check_emotion2vec_dir(str(tmp_path / "nope"))


def test_npy_dir_and_csv_errors_name_the_file(tmp_path):
    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "u1.npy", np.ones((4, 3), np.float32))
    np.save(d / "u2.npy", np.ones(3, np.float32))
    t = load_npy_dir(d)
    assert t.values["u1"].shape == (4, 3) and t.values["u2"].shape == (3,)
    np.save(d / "u3.npy", np.ones(5, np.float32))
    with pytest.raises(DataError, match="different feature sizes"):
        load_npy_dir(d)
    (tmp_path / "f.csv").write_text("utterance_id,a,b\nu1,1.0,2\nu2,x,3\n")
    with pytest.raises(DataError, match=r"f.csv, line 3, field a: expected a number, got 'x'"):
        load_feature_csv(tmp_path / "f.csv")
    with pytest.raises(DataError, match="no .wav/.flac/.ogg files"):
        extract_dir("praat", tmp_path / "npy", tmp_path / "out")
