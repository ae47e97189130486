"""The append-only record store behind the answer cache and predict's JSONL rows: a kill mid-write costs at most
the torn line, which reads skip and the next append cuts off; unreadable lines are counted, never fatal."""

import json

from train.infra.records import RecordStore


def test_a_torn_last_line_is_skipped_on_read_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "rows.jsonl"
    store = RecordStore(path)
    store.append([{"path": "a"}, {"path": "b"}])
    with open(path, "ab") as handle:
        handle.write(b'{"path": "c", "lab')  # the kill came mid-write
    torn = path.read_bytes()
    reader = RecordStore(path)
    assert reader.read() == [{"path": "a"}, {"path": "b"}] and reader.skipped_lines == 1
    assert path.read_bytes() == torn  # reading never writes
    reader.append([{"path": "c"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"path": "a"}, {"path": "b"}, {"path": "c"}]


def test_appending_to_an_unread_torn_file_repairs_it_first(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"key": "k1"}\n{"key": "k')
    RecordStore(path).append([{"key": "k2"}])
    assert path.read_bytes() == b'{"key": "k1"}\n{"key": "k2"}\n'


def test_unreadable_and_refused_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_bytes(b'{"key": "a", "answer": "x"}\nnot json\n[1, 2]\n{"key": "b"}\n\n{"key": "c", "answer": "y"}\n')
    store = RecordStore(path, validate=lambda record: "answer" in record)
    assert [r["key"] for r in store.read()] == ["a", "c"] and store.skipped_lines == 3


def test_text_is_kept_readable_or_escaped_and_odd_file_names_round_trip(tmp_path):
    readable = RecordStore(tmp_path / "answers.jsonl", ensure_ascii=False)
    readable.append([{"answer": "joie de vivre \u2028 ça"}])
    assert "ça" in readable.path.read_text(encoding="utf-8") and readable.read()[0]["answer"].endswith("ça")
    odd = "photo\udcff\u2028name.png"  # a lone surrogate (undecodable byte) and a line separator in a file name
    rows = RecordStore(tmp_path / "rows.jsonl")
    rows.append([{"path": odd}])
    assert rows.read() == [{"path": odd}] and len(rows.path.read_bytes().split(b"\n")) == 2


def test_rewrite_replaces_the_file_atomically(tmp_path):
    store = RecordStore(tmp_path / "rows.jsonl")
    store.append([{"path": "old"}])
    store.rewrite([{"path": "b"}, {"path": "a"}])
    assert store.read() == [{"path": "b"}, {"path": "a"}] and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]
    store.rewrite([])
    assert store.read() == [] and store.path.exists()
