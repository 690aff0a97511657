"""Head ablation on tiny random models: the mask against independent weight edits, the head means against
per-sample unpadded forwards, the hook's lifetime, the schedule against the scores, the held-out loss
against a per-token sum, and the report files read back."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_heads.analysis import ablation as analysis
from lit_heads.errors import ConfigError
from lit_heads.heads import find_heads
from lit_heads.heads.ablation import HeadMask, head_output_means
from lit_heads.heads.selection import select_heads
from tiny_models import sft_batch, tiny_model

HEADS = [(0, 1), (1, 3), (1, 0)]


def logits_of(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def zero_output_columns(model, heads):
    """A copy of `model` whose o_proj weight columns reading `heads` are zero."""
    edited = copy.deepcopy(model)
    layout = find_heads(edited)
    with torch.no_grad():
        for layer, head in heads:
            for piece in layout.layers[layer].output_slices(head):
                piece.param.masked_fill_(piece.mask(), 0.0)
    return edited


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "gpt_neox", "phi3", "qwen3"])
def test_zero_mask_equals_zeroed_output_projection_columns(arch):
    model = tiny_model(arch)
    batch = sft_batch()
    expected = logits_of(zero_output_columns(model, HEADS), batch)
    with HeadMask(model, HEADS, mode="zero"):
        masked = logits_of(model, batch)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    assert (masked - logits_of(model, batch)).abs().max() > 1e-3  # the heads mattered


def with_mean_bias(model, heads, means):
    """Independent form of mean ablation: the heads' o_proj columns zeroed, and their constant output
    W[:, head] @ mean added to the o_proj bias (a bias is created where the projection has none)."""
    edited = zero_output_columns(model, heads)
    layout, source = find_heads(edited), find_heads(model)
    with torch.no_grad():
        for layer in sorted({l for l, _ in heads}):
            lh = layout.layers[layer]
            o_proj = lh.o_proj
            if getattr(o_proj, "bias", None) is None:
                replacement = nn.Linear(o_proj.in_features, o_proj.out_features, bias=True)
                replacement.weight.copy_(o_proj.weight)
                replacement.bias.zero_()
                lh.attention.o_proj = replacement
                o_proj = replacement
            weight = source.layers[layer].o_proj.weight
            for l, head in heads:
                if l != layer:
                    continue
                cols = slice(head * lh.head_dim, (head + 1) * lh.head_dim)
                # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
                w = weight[:, cols] if isinstance(o_proj, nn.Linear) else weight[cols, :].T
                o_proj.bias += w @ means[layer, head]
    return edited


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mean_mask_equals_the_mean_folded_into_the_bias(arch):
    model = tiny_model(arch)
    means = head_output_means(model, [sft_batch(seed=1), sft_batch(lengths=(7, 11), prompt_lengths=(2, 3), seed=2)])
    batch = sft_batch()
    edited = with_mean_bias(model, HEADS, means)
    with HeadMask(model, HEADS, mode="mean", means=means):
        masked = logits_of(model, batch)
        # Cached greedy decoding passes every new token through the hook too.
        prompt = batch["input_ids"][:1, :5]
        out = model.generate(
            prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
    torch.testing.assert_close(masked, logits_of(edited, batch), rtol=1e-5, atol=1e-5)
    ref = edited.generate(
        prompt, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
    )
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    # Mean ablation is not zero ablation (the means are not zero).
    with HeadMask(model, HEADS, mode="zero"):
        assert (logits_of(model, batch) - masked).abs().max() > 1e-4


def test_head_output_means_count_real_tokens_only():
    model = tiny_model("llama")
    batch = sft_batch(lengths=(12, 9, 5), prompt_lengths=(4, 3, 1))
    means = head_output_means(model, [batch])
    # Independent: each sample alone, unpadded; every o_proj input row of every sample, then a plain mean.
    layout = find_heads(model)
    rows: dict[int, list[torch.Tensor]] = {l: [] for l in range(layout.n_layers)}
    handles = [
        lh.o_proj.register_forward_pre_hook(lambda m, a, l=lh.index: rows[l].append(a[0][0])) for lh in layout.layers
    ]
    with torch.no_grad():
        for b, n in enumerate((12, 9, 5)):
            model(input_ids=batch["input_ids"][b : b + 1, :n])
    for h in handles:
        h.remove()
    for layer in range(layout.n_layers):
        expected = torch.cat(rows[layer]).mean(0).view(layout.n_heads, layout.head_dim)
        torch.testing.assert_close(means[layer], expected, rtol=1e-5, atol=1e-6)
    # Padding positions have outputs too: averaging them in would give something else.
    assert means.shape == (2, 4, 8)


def test_masking_no_heads_changes_nothing_and_the_hook_goes_away():
    model = tiny_model("llama")
    batch = sft_batch()
    before = logits_of(model, batch)
    o_proj = find_heads(model).layers[1].o_proj
    with HeadMask(model, [], mode="zero"):
        assert torch.equal(logits_of(model, batch), before)
    with HeadMask(model, [(1, 2)], mode="zero"):
        assert len(o_proj._forward_pre_hooks) == 1
        assert not torch.equal(logits_of(model, batch), before)
    assert len(o_proj._forward_pre_hooks) == 0
    assert torch.equal(logits_of(model, batch), before)
    with pytest.raises(RuntimeError, match="boom"):
        with HeadMask(model, [(0, 0), (1, 2)], mode="zero"):
            raise RuntimeError("boom")
    assert torch.equal(logits_of(model, batch), before)


def test_head_mask_refuses_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="Unknown head mask mode 'half'.*'zero'.*'mean'"):
        HeadMask(model, HEADS, mode="half")
    with pytest.raises(ConfigError, match=r"shape \[2, 4, 8\].*head_output_means"):
        HeadMask(model, HEADS, mode="mean")
    with pytest.raises(ConfigError, match=r"\(layer=2, head=0\) is out of range.*2 layers x 4 heads"):
        HeadMask(model, [(2, 0)])


# ------------------------------------------------------------------------------------------------ schedule


def test_schedule_selects_what_the_scores_say():
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.3], [0.8, 0.2, 0.05, 0.7]])
    plan = analysis.plan_schedule(scores, 2, 4, ks=[3, 1], seeds=[0, 1])
    by = {(a.selection, a.seed, a.k): set(a.heads) for a in plan}
    assert by[("top", None, 1)] == {(0, 2)}
    assert by[("top", None, 3)] == {(0, 2), (1, 0), (1, 3)}
    assert by[("bottom", None, 1)] == {(1, 2)}
    assert by[("bottom", None, 3)] == {(1, 2), (0, 1), (1, 1)}
    for seed in (0, 1):
        assert by[("random", seed, 3)] == set(select_heads("random", 2, 4, top_k=3, seed=seed))
        assert by[("random", seed, 1)] <= by[("random", seed, 3)]  # one permutation per seed
    assert by[("random", 0, 3)] != by[("random", 1, 3)]
    assert [a.k for a in plan if a.selection == "top"] == [1, 3]  # sorted
    assert len(plan) == 2 * (1 + 2 + 1)


def test_schedule_refuses_bad_input():
    with pytest.raises(ConfigError, match=r"k = 9 is larger than the number of heads of this model \(8\).*from 1 to 8"):
        analysis.check_schedule([1, 9], 8, ["top"], [0])
    with pytest.raises(ConfigError, match=">= 1"):
        analysis.check_schedule([0, 2], 8, ["top"], [0])
    with pytest.raises(ConfigError, match="'middle'|middle"):
        analysis.check_schedule([1], 8, ["top", "middle"], [0])
    with pytest.raises(ConfigError, match="distinct seeds"):
        analysis.check_schedule([1], 8, ["random"], [])
    assert analysis.check_schedule([4, 1, 4], None, ["top"], []) == [1, 4]


def test_summary_takes_random_mean_min_max_over_seeds():
    rows = [
        {"selection": "random", "seed": s, "k": 2, "loss_increase": v, "accuracy_drop": None}
        for s, v in ((0, 0.1), (1, 0.4), (2, 0.25))
    ]
    rows.append({"selection": "top", "seed": None, "k": 2, "loss_increase": 1.0, "accuracy_drop": None})
    (entry,) = analysis.summarize(rows)
    assert entry["random"]["loss_increase"] == {"mean": pytest.approx(0.25), "min": 0.1, "max": 0.4, "n": 3}
    assert entry["top"]["loss_increase"]["mean"] == 1.0 and entry["random"]["accuracy_drop"] is None
    assert "bottom" not in entry


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.fixture(scope="module")
def tiny_setup(tiny_llama_dir):
    from lit_heads.data import SFTDataModule, load_source
    from lit_heads.module import SFTModule

    module = SFTModule(str(tiny_llama_dir), num_generate=0, max_new_tokens=4)
    datamodule = SFTDataModule(tokenizer=module.tokenizer, batch_size=3, max_length=128)
    examples = load_source("generated:arithmetic,string", size=7, seed=42)
    return module, datamodule, examples


def test_heldout_loss_is_token_weighted_over_the_whole_set(tiny_setup):
    module, datamodule, examples = tiny_setup
    evaluator = analysis.Evaluator(module, datamodule, examples, num_generate=0)
    # Independent: every sample alone, the sum of its response-token cross-entropies, over all tokens.
    total, tokens, batch_means = 0.0, 0, []
    for sample in datamodule.encoder.encode_all(examples)[0]:
        ids = torch.tensor([sample["input_ids"]])
        labels = torch.tensor(sample["labels"])
        with torch.no_grad():
            logits = module.model(input_ids=ids).logits[0].double()
        total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"))
        tokens += int((labels[1:] != -100).sum())
    for batch in evaluator.batches:
        with torch.no_grad():
            batch_means.append(float(module.loss(batch)))
    assert evaluator.n_tokens == tokens
    assert evaluator.loss() == pytest.approx(total / tokens, rel=1e-5)
    # The mean of per-batch means is another number here, so the test can tell them apart.
    assert abs(sum(batch_means) / len(batch_means) - total / tokens) > 1e-4


def test_accuracy_needs_checkable_examples(tiny_setup):
    from lit_heads.data.records import Example

    module, datamodule, _ = tiny_setup
    plain = [Example("What is up?", "Nothing.", None, "file", "x#0")]
    with pytest.raises(ConfigError, match="--num_generate 0"):
        analysis.Evaluator(module, datamodule, plain, num_generate=1)


@pytest.mark.slow
def test_run_ablation_rows_and_report_files_read_back(tiny_setup, tmp_path):
    module, datamodule, examples = tiny_setup
    evaluator = analysis.Evaluator(module, datamodule, examples, num_generate=1)
    scores = torch.arange(8.0).view(2, 4)
    schedule = analysis.plan_schedule(scores, 2, 4, ks=[1, 2], seeds=[0, 1])
    partial = []
    run = analysis.run_ablation(
        evaluator,
        module.model,
        schedule,
        mode="zero",
        progress=None,
        on_row=lambda base, rows: partial.append(len(rows)),
    )
    assert partial == list(range(1, len(schedule) + 1))
    base, rows = run["base"], run["rows"]
    assert len(rows) == len(schedule) == 8
    # A row is the evaluation under its mask, independently re-measured.
    top2 = next(r for r in rows if r["selection"] == "top" and r["k"] == 2)
    assert top2["heads"] == [[1, 2], [1, 3]]
    with HeadMask(module.model, [(1, 2), (1, 3)], mode="zero"):
        assert evaluator.loss() == pytest.approx(top2["loss"], rel=1e-6)
    for row in rows:
        assert row["loss_increase"] == pytest.approx(row["loss"] - base["loss"])
        assert row["accuracy_drop"] == pytest.approx(base["accuracy"] - row["accuracy"])
    assert evaluator.loss() == pytest.approx(base["loss"], rel=1e-6)  # nothing left masked

    results = analysis.results_document(
        config={"data": "generated:arithmetic,string", "seeds": [0, 1]},
        model={"name": "tiny", "n_layers": 2, "n_heads": 4},
        scores={"name": "arange"},
        mask="zero",
        evaluator=evaluator,
        run=run,
    )
    paths = analysis.write_report(results, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(analysis.REPORT_FILES)
    back = analysis.read_results(tmp_path)
    assert back["rows"] == json.loads(json.dumps(rows)) and back["complete"] is True
    assert back["n_tokens"] == evaluator.n_tokens and back["n_graded"] == 1
    with open(paths["results.csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["selection"] for r in table] == [r["selection"] for r in rows]
    assert [float(r["loss_increase"]) for r in table] == pytest.approx([r["loss_increase"] for r in rows])
    assert table[0]["heads"] == " ".join(f"{l}:{h}" for l, h in rows[0]["heads"])
    report = paths["report.md"].read_text()
    random1 = back["summary"][0]["random"]["loss_increase"]
    assert (
        f"| 1 | {rows[0]['loss_increase']:+.4f} | {random1['mean']:+.4f} [{random1['min']:+.4f}, {random1['max']:+.4f}]"
        in report
    )
    assert paths["ablation.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_go_to_the_logger(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    from lit_heads.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    rows = [
        {
            "selection": sel,
            "seed": seed,
            "k": k,
            "loss": 1.0 + v,
            "loss_increase": v,
            "accuracy": 0.5,
            "accuracy_drop": 0.0,
            "seconds": 0.1,
            "heads": [[0, 0]] * k,
        }
        for sel, seed, k, v in (
            ("top", None, 1, 0.5),
            ("top", None, 2, 0.9),
            ("random", 0, 1, 0.1),
            ("random", 1, 1, 0.3),
            ("random", 0, 2, 0.2),
            ("random", 1, 2, 0.4),
        )
    ]
    results = {
        "config": {"k": [1, 2]},
        "base": {"loss": 1.0, "accuracy": 0.5},
        "rows": rows,
        "summary": analysis.summarize(rows),
    }
    calls = {}
    monkeypatch.setattr(logger, "log_table", lambda **kwargs: calls.setdefault("table", kwargs))
    monkeypatch.setattr(logger, "log_image", lambda **kwargs: calls.setdefault("image", kwargs))
    try:
        analysis.log_results(logger, results, tmp_path / "ablation.png")
    finally:
        logger.finish()  # else the next WandbLogger in this process adopts the open run
    assert calls["image"] == {"key": "ablate/plot", "images": [str(tmp_path / "ablation.png")]}
    assert calls["table"]["columns"] == list(analysis.CSV_COLUMNS) and len(calls["table"]["data"]) == len(rows)
    assert calls["table"]["data"][1][:3] == ["top", None, 2] and calls["table"]["data"][1][-1] == "0:0 0:0"
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == {"step": 0, "ablate/base/loss": 1.0, "ablate/base/accuracy": 0.5}
    at_k2 = next(m for m in logged if m["step"] == 2)
    assert at_k2["ablate/top/loss_increase"] == 0.9
    assert at_k2["ablate/random/loss_increase"] == pytest.approx(0.3)
    assert (at_k2["ablate/random/loss_increase_min"], at_k2["ablate/random/loss_increase_max"]) == (0.2, 0.4)
    assert not math.isnan(at_k2["ablate/random/accuracy_drop"])
