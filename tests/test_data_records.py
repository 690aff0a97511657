"""Record formats, readers and their error messages (no tokenizer needed)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lit_heads.data import (
    Example,
    detect_format,
    example_to_record,
    extract_final_number,
    load_examples,
    parse_gsm8k_answer,
    readers,
    record_to_example,
)
from lit_heads.errors import DataError

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize(
    "record, fmt, expected",
    [
        ({"prompt": "Say hi", "response": "hi"}, "prompt_response", Example("Say hi", "hi")),
        ({"prompt": "Say hi", "completion": "hi"}, "prompt_response", Example("Say hi", "hi")),
        (
            {"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"},
            "question_answer",
            Example("2+2?", "2+2=<<2+2=4>>4\n#### 4", "4", "gsm8k"),
        ),
        ({"question": "Capital of France?", "answer": "Paris"}, "question_answer",
         Example("Capital of France?", "Paris", "Paris")),
        ({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca", Example("Translate\n\nchat", "cat")),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", Example("Say hi", "hi")),
        ({"instruction": "Say hi", "output": "hi"}, "alpaca", Example("Say hi", "hi")),
    ],
)
def test_formats_are_detected_and_converted(record, fmt, expected):
    assert detect_format(record) == fmt
    assert record_to_example(record) == expected


def test_messages_last_assistant_is_response_and_earlier_turns_are_prompt():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = record_to_example({"messages": messages, "prompt": "distractor"})
    assert example.response == "4"
    assert example.prompt == messages[:4]


def test_format_override_picks_the_requested_fields():
    # Both alpaca and question_answer keys: auto takes alpaca, the override takes question/answer.
    record = {"instruction": "i", "output": "o", "question": "q", "answer": "#### 7"}
    assert record_to_example(record).response == "o"
    forced = record_to_example(record, "question_answer")
    assert (forced.prompt, forced.answer, forced.task) == ("q", "7", "gsm8k")


def test_override_with_missing_keys_names_format_and_keys():
    with pytest.raises(DataError,
                       match=r"x\.jsonl:3: format 'alpaca' was requested.*lacks \['instruction', "
                             r"'output'\].*\['prompt', 'response'\]"):
        record_to_example({"prompt": "p", "response": "r"}, "alpaca", "x.jsonl:3")


def test_unknown_record_lists_formats_and_keys_seen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl",
                       [{"prompt": "p", "response": "r"}, {"task_id": "x", "canonical_solution": "y"}])
    with pytest.raises(DataError) as err:
        load_examples(path)
    message = str(err.value)
    assert f"{path}:2" in message
    assert "['canonical_solution', 'task_id']" in message
    for name in ("prompt_response", "question_answer", "alpaca", "messages"):
        assert name in message


def test_unknown_format_name_lists_known_formats():
    with pytest.raises(DataError, match="Unknown data format 'csv'") as err:
        load_examples("unused.jsonl", format="csv")
    assert all(name in str(err.value) for name in ("auto", "prompt_response", "question_answer", "alpaca", "messages",
                                                   "sharegpt"))


def test_sharegpt_conversations_are_detected_and_become_chat_messages(tmp_path):
    record = {"id": "x", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]}
    assert detect_format(record) == "sharegpt"
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [record])
    [example] = load_examples(path)
    assert example == Example(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}], "4")
    assert load_examples(path, format="sharegpt") == [example]


@pytest.mark.parametrize("conversations, message", [
    ([{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}],
     r"conversation turn 1 must be a dict with 'from' one of \['gpt', 'human', 'system'\]"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": 3}], "conversation turn 1 .* string 'value'"),
    ([{"from": "human", "value": "a"}], "'conversations' needs at least one message before an assistant"),
    ([], "'conversations' must be a non-empty list"),
])
def test_bad_sharegpt_records_are_reported(conversations, message):
    with pytest.raises(DataError, match=rf"x\.jsonl:4: {message}"):
        record_to_example({"conversations": conversations}, where="x.jsonl:4")


@pytest.mark.parametrize("record", [
    {"instruction": "Natalia sold 48 clips...", "output": "48 + 24 = 72\n#### 72"},
    {"messages": [{"role": "user", "content": "Natalia sold 48 clips..."},
                  {"role": "assistant", "content": "48 + 24 = 72\n#### 72"}]},
    {"conversations": [{"from": "human", "value": "Natalia sold 48 clips..."},
                       {"from": "gpt", "value": "48 + 24 = 72\n#### 72"}]},
    {"prompt": "Natalia sold 48 clips...", "completion": "48 + 24 = 72\n#### 72"},
])
def test_a_response_ending_in_gsm8k_marker_gives_its_number_as_answer(record):
    example = record_to_example(record)
    assert (example.answer, example.task) == ("72", "gsm8k")
    from lit_heads.data import is_checkable, is_correct

    assert is_checkable(example) and is_correct(example, "So she sold 72 clips.") and not is_correct(example, "48")


def test_an_explicit_answer_or_a_marker_not_on_the_last_line_wins_over_the_response():
    assert record_to_example({"instruction": "i", "output": "#### 72", "answer": "70"}).answer == "70"
    assert record_to_example({"instruction": "i", "output": "#### 72\nThat is all."}).answer is None
    assert record_to_example({"instruction": "i", "output": "72"}).answer is None


@pytest.mark.parametrize(
    "record, field",
    [
        ({"prompt": "p", "response": 3}, "response"),
        ({"prompt": "p", "response": ["a"]}, "response"),
        ({"instruction": 1, "output": "o"}, "instruction"),
        ({"question": "q", "answer": None}, "answer"),
    ],
)
def test_wrong_field_types_name_file_line_and_field(tmp_path, record, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "response": "ok"}, record])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: field '{field}' must be a string"):
        load_examples(path)


def test_bad_messages_are_reported():
    with pytest.raises(DataError, match="message 1 must be a dict with string 'role' and 'content'"):
        record_to_example({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]})
    with pytest.raises(DataError, match="at least one message before an assistant"):
        record_to_example({"messages": [{"role": "user", "content": "a"}]})


def test_numeric_answer_and_extra_task_keys_round_trip():
    example = Example("What is 6*7?", "x1 = 6 * 7\nprint(x1)", "42", "math_code")
    assert record_to_example(example_to_record(example)) == example
    assert record_to_example({"question": "6*7?", "answer": 42}).answer == "42"


# ---------------------------------------------------------------- GSM8K answers and numbers


@pytest.mark.parametrize(
    "text, answer",
    [("a\n#### 18", "18"), ("#### 1,000", "1000"), ("x #### 3\n#### -5 ", "-5"), ("no marker 5", None)],
)
def test_parse_gsm8k_answer(text, answer):
    assert parse_gsm8k_answer(text) == answer


@pytest.mark.parametrize(
    "text, number",
    [
        ("She makes $1,250. Then 3.5 more", "3.5"),
        ("so the total is $1,250.", "1250"),
        ("x2 = x1 - 4", "4"),
        ("3-4", "4"),
        ("answer: -7", "-7"),
        ("x1 and y2", None),
        ("", None),
    ],
)
def test_extract_final_number(text, number):
    assert extract_final_number(text) == number


# ---------------------------------------------------------------- readers


def test_jsonl_json_and_parquet_read_the_same_examples(tmp_path):
    records = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": records}))
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    expected = [Example(f"p{i}", f"r{i}") for i in range(3)]
    for path in (jsonl, tmp_path / "list.json", tmp_path / "wrapped.json", tmp_path / "d.parquet"):
        assert load_examples(path) == expected, path
    assert load_examples(tmp_path / "d.parquet")[2].source.endswith("d.parquet:row 2")


def test_blank_lines_are_skipped_but_line_numbers_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": "d"}\n')
    examples = load_examples(path)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:3"]


def test_malformed_jsonl_line_gives_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON line"):
        load_examples(path)


def test_malformed_json_file_gives_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"prompt": "a",\n "response": }\n]')
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON"):
        load_examples(path)


def test_json_that_is_not_a_list_explains_the_shapes(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"rows": []}')
    with pytest.raises(DataError, match=r"list of records or \{\"data\": \[records\]\}.*keys \['rows'\]"):
        load_examples(path)


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_jsonl_strings_may_hold_characters_that_splitlines_would_split_on(tmp_path, separator):
    path = tmp_path / "d.jsonl"
    # json.dumps(ensure_ascii=False) writes these raw, as many tools do; JSON allows them inside strings.
    lines = [json.dumps({"prompt": f"a{separator}b", "response": "c"}, ensure_ascii=False),
             json.dumps({"prompt": "d", "response": "e"})]
    path.write_text("\r\n".join(lines) + "\n", encoding="utf-8")
    examples = load_examples(path)
    assert [e.prompt for e in examples] == [f"a{separator}b", "d"]
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:2"]


@pytest.mark.parametrize("data, shown", [({"rows": []}, "dict"), ("abc", "str"), (None, "NoneType")])
def test_json_whose_data_field_is_not_a_list_says_so(tmp_path, data, shown):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": data}))
    with pytest.raises(DataError,
                       match=rf"{path}: the file's 'data' field must be a list of records, but it is {shown}"):
        load_examples(path)


def test_non_utf8_file_is_reported_with_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: the file is not valid UTF-8.*0xe9"):
        load_examples(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "response": "b"}\n')
    assert load_examples(path) == [Example("a", "b")]


def test_missing_file_says_it_does_not_exist_and_skips_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.load_dataset", lambda *a, **k: pytest.fail("a file path must not go to the hub"))
    path = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match=rf"Data file {path} does not exist"):
        load_examples(path)
    # 'data/train.jsonl' has the owner/name shape but is clearly a file name.
    with pytest.raises(DataError, match="does not exist"):
        load_examples("data/train.jsonl")


def test_hub_id_is_tried_and_failure_explains_both_attempts(monkeypatch):
    calls = []

    def offline(repo, config=None, split=None):
        calls.append((repo, config, split))
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_examples("openai/gsm8k:main", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    message = str(err.value)
    assert "not a local file" in message and "hub data set" in message and "ConnectionError: no network" in message


def test_hub_rows_become_examples(monkeypatch):
    monkeypatch.setattr("datasets.load_dataset",
                        lambda repo, config=None, split=None: [{"question": "q", "answer": "#### 2"}])
    [example] = load_examples("someone/data")
    assert (example.answer, example.task, example.source) == ("2", "gsm8k", "someone/data[train] row 0")


def test_directory_and_unsupported_suffix_are_errors(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        load_examples(tmp_path)
    csv = tmp_path / "d.csv"
    csv.write_text("prompt,response\na,b\n")
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'.*\.jsonl, \.json, \.parquet"):
        load_examples(csv)


@pytest.mark.parametrize("content", ["", "\n\n", "[]", '{"data": []}'])
def test_empty_data_set_is_an_error(tmp_path, content):
    path = tmp_path / ("d.json" if content.startswith(("[", "{")) else "d.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match="holds no records"):
        load_examples(path)


def test_readers_reject_non_object_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [["a", "b"]])
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object"):
        load_examples(path)


def test_hub_id_shape():
    assert readers.looks_like_hub_id("openai/gsm8k")
    assert readers.looks_like_hub_id("openai/gsm8k:main")
    assert not readers.looks_like_hub_id("gsm8k")
    assert not readers.looks_like_hub_id("./a/b")
    assert not readers.looks_like_hub_id("data/test.parquet")


# ---------------------------------------------------------------- real data


def test_shared_gsm8k_loads_as_question_answer_with_numeric_answers():
    path = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"real GSM8K data not found at {path} (the shared data folder is absent on this machine)")
    examples = load_examples(path)
    assert len(examples) == 1319
    assert all(e.task == "gsm8k" for e in examples)
    for e in examples:
        float(e.answer)  # every answer is a plain number once '####' and commas are stripped
    assert examples[0].answer == "18"
    assert examples[0].response.endswith("#### 18")
