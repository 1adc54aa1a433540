import json

import pytest

from erc_llm.data import IEMOCAP_LABELS, MELD_LABELS, DataError, load_split, to_hf_dataset
from erc_llm.data.text import normalize_text
from tests.conftest import write_jsonl_dataset
from tests.data.iemocap_fixture import write_iemocap

HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def write_meld(tmp_path, rows: list[str], split="train", header=HEADER, encoding="utf-8"):
    (tmp_path / f"{split}_sent_emo.csv").write_bytes((header + "".join(r + "\n" for r in rows)).encode(encoding))
    return tmp_path


GOOD = ['1,Hi there.,Ross,neutral,neutral,0,0,1,1,"00:00:01,000","00:00:02,000"',
        '2,Oh no!,Rachel,fear,negative,0,1,1,1,"00:00:02,000","00:00:03,000"']


# --- MELD -----------------------------------------------------------------------------------------

def test_meld_real_splits(meld_dir):
    expected = {"train": (1038, 9989), "dev": (114, 1109), "test": (280, 2610)}
    for split, (n_dia, n_utt) in expected.items():
        dialogues, labels, report = load_split("meld", split, meld_dir)
        assert (len(dialogues), sum(len(d) for d in dialogues)) == (n_dia, n_utt)
        assert labels == MELD_LABELS and not report.skipped
    d0 = dialogues[0]
    assert d0.id == "dia0" and d0.utterances[0].utterance_id == "dia0_utt0"
    assert all(u.emotion in MELD_LABELS for d in dialogues for u in d.utterances)
    assert all("’" not in u.text for d in dialogues for u in d.utterances)  # quotes straightened


def test_meld_turns_sorted_by_utterance_id(tmp_path):
    rows = [GOOD[1].replace(",0,1,", ",0,2,"), GOOD[0]]
    dialogues, _, _ = load_split("meld", "train", write_meld(tmp_path, rows))
    assert [u.text for u in dialogues[0].utterances] == ["Hi there.", "Oh no!"]


@pytest.mark.parametrize("rows,header,needles", [
    (GOOD, HEADER.replace("Emotion,", "Feeling,"), ["missing column", "Emotion"]),
    ([GOOD[0], GOOD[1].replace("fear", "angst")], HEADER, ["line 3", "field Emotion", "'angst'", "valid labels", "surprise"]),
    ([GOOD[0], GOOD[1].replace("Oh no!", "  ")], HEADER, ["line 3", "field Utterance", "empty text"]),
    ([GOOD[0], GOOD[0]], HEADER, ["duplicate utterance id", "dia0_utt0"]),
    ([GOOD[0].replace(",0,0,", ",x,0,")], HEADER, ["line 2", "must be integers"]),
])
def test_meld_bad_input_names_file_line_and_field(tmp_path, rows, header, needles):
    write_meld(tmp_path, rows, header=header)
    with pytest.raises(DataError) as e:
        load_split("meld", "train", tmp_path)
    assert "train_sent_emo.csv" in str(e.value)
    for n in needles:
        assert n in str(e.value)


def test_meld_reports_all_bad_rows_at_once(tmp_path):
    write_meld(tmp_path, [GOOD[0].replace("neutral,neutral", "meh,neutral"), GOOD[1].replace("fear", "angst")])
    with pytest.raises(DataError, match="2 problem"):
        load_split("meld", "train", tmp_path)


def test_meld_broken_encoding_and_missing_split(tmp_path):
    write_meld(tmp_path, ['1,Caf\xe9,Ross,joy,positive,0,0,1,1,"a","b"'], encoding="latin-1")
    with pytest.raises(DataError, match=r"line 2: byte 0xe9 is not valid UTF-8"):
        load_split("meld", "train", tmp_path)
    with pytest.raises(DataError, match=r"dev_sent_emo.csv.*erc-llm data download meld"):
        load_split("meld", "dev", tmp_path)
    with pytest.raises(DataError, match=r"available splits"):
        load_split("meld", "validation", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"available datasets = \['meld', 'iemocap', 'jsonl'\]"):
        load_split("friends", "train", ".")


# --- text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,clean", [
    ("You must\x92ve had", "You must've had"),
    ("Itâ€™s fine", "It's fine"),
    ("Â Hello", "Hello"),
    ("\u201cHi\u201d  there\n\tyou", '"Hi" there you'),
    ("Wait\x85", "Wait..."),
])
def test_normalize_text(raw, clean):
    assert normalize_text(raw) == clean


# --- IEMOCAP --------------------------------------------------------------------------------------

def test_iemocap_protocol(tmp_path):
    root = write_iemocap(tmp_path / "IEMOCAP_full_release")
    train, labels, report = load_split("iemocap", "train", root)
    dev, _, _ = load_split("iemocap", "dev", root)
    test, _, _ = load_split("iemocap", "test", root)
    assert labels == IEMOCAP_LABELS
    # 12 session 1-4 dialogues sorted by name; every 10th (0, 10) is dev
    assert [d.id for d in dev] == ["Ses01F_impro01", "Ses04F_impro03"]
    assert len(train) == 10 and all(d.meta["session"] in (1, 2, 3, 4) for d in train)
    assert {d.meta["session"] for d in test} == {5}
    d = test[0]
    assert [u.utterance_id[-4:] for u in d.utterances] == ["M000", "F000", "M001", "F001", "M002", "F003"]
    assert [u.emotion for u in d.utterances] == ["angry", "neutral", "frustrated", "happy", "excited", "sad"]
    assert d.utterances[0].speaker == "Ses05_M" and d.utterances[1].speaker == "Ses05_F"
    assert d.utterances[0].meta["vad"] == (2.5, 3.0, 3.5)
    # xxx and sur dropped and counted (2 per dialogue), breathing lines counted
    assert report.skipped["label 'xxx' outside the 6 classes"] == 12
    assert report.skipped["label 'sur' outside the 6 classes"] == 12
    assert "skipped" in report.summary()


def test_iemocap_missing_layout(tmp_path):
    with pytest.raises(DataError, match=r"Session1/dialog/transcriptions.*IEMOCAP_full_release"):
        load_split("iemocap", "train", tmp_path)


# --- generic JSONL --------------------------------------------------------------------------------

def test_jsonl_infers_labels_and_exports(tmp_path):
    root = write_jsonl_dataset(tmp_path)
    dialogues, labels, report = load_split("jsonl", "test", root)
    assert set(labels.labels) == {"neutral", "joy", "anger", "surprise"}
    assert labels.labels[0] in ("surprise", "joy")  # most frequent in train first
    assert report.dialogues == 3 and dialogues[0].utterances[0].utterance_id == "test0_0"
    ds = to_hf_dataset(dialogues)
    assert ds.num_rows == 3 and ds[0]["utterances"][0]["speaker"] == "Ross"


def test_jsonl_given_labels_and_errors(tmp_path):
    root = write_jsonl_dataset(tmp_path)
    with pytest.raises(DataError, match=r"test.jsonl, line 1, utterances\[1\], field emotion: unknown label 'joy'"):
        load_split("jsonl", "test", root, labels=("neutral", "anger", "surprise"))
    (root / "dev.jsonl").write_text(json.dumps({"dialogue_id": "a", "utterances": [{"speaker": "A", "text": "x"}]}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"dev.jsonl, line 2: invalid JSON"):
        load_split("jsonl", "dev", root)
    (root / "dev.jsonl").write_text(json.dumps({"dialogue_id": "a", "utterances": [{"speaker": "A"}]}) + "\n")
    with pytest.raises(DataError, match=r"line 1, utterances\[0\]: expected an object with 'speaker' and 'text'"):
        load_split("jsonl", "dev", root)


def test_a_duplicated_meld_column_is_an_error_naming_both_positions(tmp_path, meld_dir):
    from erc_llm.data.meld import load_meld
    from erc_llm.data.schema import DataError

    lines = (meld_dir / "dev_sent_emo.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    i = header.index("Emotion")
    (tmp_path / "dev_sent_emo.csv").write_text("\n".join([lines[0] + ",Emotion"] + [ln + ",neutral" for ln in lines[1:30]]),
                                               encoding="utf-8")
    with pytest.raises(DataError, match=rf"column 'Emotion' 2 times \(columns \[{i + 1}, {len(header) + 1}\]\)"):
        load_meld(tmp_path, "dev")


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    from erc_llm.data.jsonl import load_jsonl
    from tests.conftest import toy_dialogue, write_dialogues

    write_dialogues(tmp_path / "test.jsonl", [toy_dialogue(3)])
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "test.jsonl").read_bytes())
    dialogues, _ = load_jsonl(tmp_path, "test", None)
    assert len(dialogues[0].utterances) == 3
