import json

import pytest
import torch

from lessctl import data as D
from lessctl.models import byte_tokenizer

PARAGRAPH = (
    "The history of the city begins in the early medieval period, when a small settlement "
    "grew around a river crossing. Over the following centuries, trade brought merchants."
)


def test_token_windows_join_with_eos():
    tok = byte_tokenizer()
    w = D.token_windows([PARAGRAPH, PARAGRAPH], tok, seq_len=32)
    assert w.dtype == torch.long and w.shape[1] == 32
    flat = w.flatten().tolist()
    n = len(PARAGRAPH.encode())
    assert flat[n] == tok.eos_token_id  # the EOS sits between the two documents
    assert w.shape[0] == (2 * (n + 1)) // 32


def test_token_windows_max_tokens_and_too_short():
    tok = byte_tokenizer()
    assert D.token_windows([PARAGRAPH] * 10, tok, 16, max_tokens=64).shape == (4, 16)
    with pytest.raises(D.DataError, match="fewer than one window"):
        D.token_windows(["hi"], tok, 64)


def test_local_text_and_jsonl(compose, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text(PARAGRAPH)
    c = D.load_texts(compose(f"data.path={txt}").data)
    assert c.items == [PARAGRAPH] and c.source == f"file:{txt}"
    js = tmp_path / "b.jsonl"
    js.write_text("\n".join(json.dumps({"text": t}) for t in ["one doc", "two doc"]))
    assert D.load_texts(compose(f"data.path={js}").data).items == ["one doc", "two doc"]


def test_local_pairs(compose, tmp_path):
    js = tmp_path / "s.jsonl"
    js.write_text(json.dumps({"document": "long text", "summary": "short"}) + "\n")
    c = D.load_pairs(compose("data=xsum", f"data.path={js}").data, "test")
    assert c.items == [("long text", "short")]


def test_bad_files(compose, tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_texts(compose(f"data.path={tmp_path}/missing.txt").data)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(D.DataError, match="bad.jsonl:2"):
        D.load_texts(compose(f"data.path={bad}").data)
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(D.DataError, match="lacks field"):
        D.load_texts(compose(f"data.path={nofield}").data)
    with pytest.raises(D.DataError, match="summarization"):
        D.load_texts(compose("data=xsum").data)


def test_auto_falls_back_to_stand_in_and_records_it(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path))
    monkeypatch.setattr(D, "hub_reachable", lambda: False)
    (tmp_path / "corpora").mkdir()
    (tmp_path / "corpora" / "wikitext.jsonl").write_text(json.dumps({"text": PARAGRAPH}) + "\n")
    c = D.load_texts(compose("data=wikitext2").data)
    assert c.source == "embedded:wikitext" and c.items == [PARAGRAPH]
    with pytest.raises(D.DataError, match="unreachable"):
        D.load_texts(compose("data=wikitext2", "data.source=hub").data)


def test_no_stand_in_and_no_hub(compose, monkeypatch):
    monkeypatch.setattr(D, "hub_reachable", lambda: False)
    with pytest.raises(D.DataError, match="no embedded stand-in"):
        D.load_pairs(compose("data=multinews").data)


@pytest.mark.parametrize("name", ["binary.txt", "binary.jsonl"])
def test_a_binary_data_file_is_one_line_naming_it(compose, tmp_path, name):
    """Was a UnicodeDecodeError traceback."""
    path = tmp_path / name
    path.write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)))
    with pytest.raises(D.DataError) as e:
        D.load_texts(compose(f"data.path={path}").data)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "not UTF-8" in msg and "line 2" in msg


def test_a_data_file_row_that_is_not_an_object_or_a_folder_is_one_line(compose, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(D.DataError, match=r"rows.jsonl: row 2 lacks field\(s\) text"):
        D.load_texts(compose(f"data.path={rows}").data)
    rows.write_text('{"text": 5}\n')
    with pytest.raises(D.DataError, match=r"row 1 lacks field\(s\) text"):
        D.load_texts(compose(f"data.path={rows}").data)
    folder = tmp_path / "dir.txt"
    folder.mkdir()
    with pytest.raises(D.DataError, match="is not a file"):
        D.load_texts(compose(f"data.path={folder}").data)


def test_local_text_keeps_its_text_and_universal_newlines(compose, tmp_path):
    """Reading bytes (to name a bad one) must not change what a good file gives."""
    p = tmp_path / "t.txt"
    p.write_bytes("caf\u00e9 line one\r\nline two\rthree\n".encode())
    assert D.load_texts(compose(f"data.path={p}").data).items == [
        "caf\u00e9 line one\nline two\nthree\n"
    ]
    j = tmp_path / "t.jsonl"
    j.write_bytes(b'{"text": "a\\u2028b \xe2\x80\xa8 c"}\r\n\r\n{"text": "d"}\n')
    assert D.load_texts(compose(f"data.path={j}").data).items == ["a\u2028b \u2028 c", "d"]
