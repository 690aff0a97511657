"""The study pipeline: its analysis helpers on patterns with known answers, the whole pipeline on a
tiny model (seconds), and the CI profile on the real bundled model (integration)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_heads.analysis.study import (
    ARMS,
    MIX_ARMS,
    PAPER,
    StudyConfig,
    change_over_steps,
    composition,
    plan_budget,
    resolve_device,
    similarity,
    specificity,
    trainer_device,
)
from lit_heads.errors import ConfigError, DataError
from lit_heads.heads import stats
from lit_heads.heads.history import PatternHistory

ROOT = Path(__file__).resolve().parents[1]


def _halves(signal, noise, rng):
    return {"a": signal + noise * torch.randn(signal.shape, generator=rng),
            "b": signal + noise * torch.randn(signal.shape, generator=rng)}


def test_similarity_diagonal_is_within_task_and_separates_distinct_tasks():
    rng = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, generator=rng), torch.randn(6, 5, generator=rng)
    halves = {"x": _halves(x, 0.1, rng), "x_again": _halves(x, 0.1, rng), "y": _halves(y, 0.1, rng)}
    m = np.asarray(similarity(halves, stats.pearson))
    assert m[0, 0] == pytest.approx(stats.pearson(halves["x"]["a"], halves["x"]["b"]))
    # Off the diagonal: the mean of the two half-vs-half pairings, so the matrix is symmetric.
    assert m[0, 2] == pytest.approx(0.5 * (stats.pearson(halves["x"]["a"],
                                                         halves["y"]["b"]) + stats.pearson(halves["x"]["b"],
                                                                                           halves["y"]["a"])))
    assert np.allclose(m, m.T)
    assert m[0, 1] > 0.9 and abs(m[0, 2]) < 0.6  # same signal ~ noise floor; different signal far below
    spec = specificity(m.tolist(), list(halves))
    assert spec["within_mean"] == pytest.approx(np.mean(np.diag(m)))
    assert spec["per_task"]["y"]["between_mean"] == pytest.approx((m[2, 0] + m[2, 1]) / 2)


def test_composition_recovers_exact_alpha_and_control_fits_worse():
    rng = torch.Generator().manual_seed(1)
    a, c, s = (torch.rand(8, 6, generator=rng) for _ in range(3))
    deltas = {n: {"full": x, "a": x, "b": x} for n, x in (("arithmetic", a), ("code", c), ("string", s))}
    target = {"full": 0.6 * a + 0.4 * c, "a": 0.6 * a + 0.4 * c, "b": 0.6 * a + 0.4 * c + 0.01}
    out = composition(target, deltas, ["arithmetic", "code"], ["string"])
    for method in ("lstsq", "nnls"):
        assert out["main"][method]["alpha"] == pytest.approx({"arithmetic": 0.6, "code": 0.4}, abs=1e-5)
        assert out["main"][method]["r2"] == pytest.approx(1.0, abs=1e-6)
    assert set(out["controls"]) == {"string+code (string instead of arithmetic)",
                                    "arithmetic+string (string instead of code)", "string alone"}
    assert all(fits["lstsq"]["r2"] < 0.999 for fits in out["controls"].values())
    assert set(out["all_basic"]["nnls"]["alpha"]) == {"arithmetic", "code", "string"}
    assert out["all_basic"]["nnls"]["alpha"]["string"] == pytest.approx(0.0, abs=1e-5)
    assert np.asarray(out["residual"]).shape == (8, 6)
    assert 0.9 < out["noise_ceiling_r2"] <= 1.0


def _lstsq_r2(y, columns):
    """R² of a no-intercept least-squares fit, computed here from scratch (1 - SS_res / SS_tot)."""
    y = np.asarray(y, dtype=float).ravel()
    x = np.stack([np.asarray(c, dtype=float).ravel() for c in columns], axis=1)
    w = np.linalg.lstsq(x, y, rcond=None)[0]
    return 1 - np.sum((y - x @ w) ** 2) / np.sum((y - y.mean()) ** 2)


def test_cross_half_r2_and_noise_ceiling_against_a_direct_computation():
    from lit_heads.analysis.study import cross_half_r2

    rng = torch.Generator().manual_seed(3)
    a, c, s = (torch.rand(6, 5, generator=rng) for _ in range(3))
    deltas = {n: _halves(x, 0.05, rng) for n, x in (("arithmetic", a), ("code", c), ("string", s))}
    for d in deltas.values():
        d["full"] = (d["a"] + d["b"]) / 2
    target = _halves(0.7 * a + 0.3 * c, 0.05, rng)
    target["full"] = (target["a"] + target["b"]) / 2
    expected = 0.5 * (_lstsq_r2(target["a"], [deltas["arithmetic"]["b"], deltas["code"]["b"]])
                      + _lstsq_r2(target["b"], [deltas["arithmetic"]["a"], deltas["code"]["a"]]))
    assert cross_half_r2(target, {k: deltas[k] for k in ("arithmetic", "code")}) == pytest.approx(expected)
    out = composition(target, deltas, ["arithmetic", "code"], ["string"])
    assert out["main"]["cross_half_r2"] == pytest.approx(expected)
    ceiling = 0.5 * (_lstsq_r2(target["a"], [target["b"]]) + _lstsq_r2(target["b"], [target["a"]]))
    assert out["noise_ceiling_r2"] == pytest.approx(ceiling)
    assert out["main"]["lstsq"]["r2"] == pytest.approx(_lstsq_r2(target["full"],
                                                                 [deltas["arithmetic"]["full"],
                                                                  deltas["code"]["full"]]))
    # A control made of noise only cannot cross the halves: its R² stays far below the true composition's.
    assert out["controls"]["string alone"]["cross_half_r2"] < out["main"]["cross_half_r2"] - 0.3


def _task(name, kind, n):
    from lit_heads.analysis.study import Task
    from lit_heads.data import Example

    return Task(name, kind, [], [Example(f"{name} q{i}", "r", "1", name) for i in range(n)])


def test_probe_modes_choose_the_documented_samples():
    from lit_heads.analysis.study import probe

    tasks = {"b1": _task("b1", "basic", 10), "b2": _task("b2", "basic", 10), "c": _task("c", "complex", 10)}
    assert probe(tasks, "b1", 4) == tasks["b1"].heldout[:4] == probe(tasks, "b1", 4, "own", "c")
    assert probe(tasks, "b1", 4, "complex", "c") == tasks["c"].heldout[:4] == probe(tasks, "b2", 4, "complex", "c")
    mixed = probe(tasks, "b1", 12, "mix", "c")
    assert mixed == probe(tasks, "c", 12, "mix", "c")  # one shared probe, whichever model asks
    assert [e.task for e in mixed] == ["b1", "b1", "b2", "b2", "c", "c"] * 2
    assert {e.prompt for e in mixed} == {f"{t} q{i}" for t in tasks for i in range(4)}
    for half in (mixed[0::2], mixed[1::2]):  # the halves StudyRunner.halves takes hold every task equally
        assert sorted(e.task for e in half) == ["b1", "b1", "b2", "b2", "c", "c"]
    with pytest.raises(ConfigError, match=r"needs an even number >= 2 per task.*multiple of 6"):
        probe(tasks, "b1", 9, "mix", "c")
    with pytest.raises(ConfigError, match=r"Unknown probe mode 'shared'"):
        probe(tasks, "b1", 4, "shared", "c")


def test_summary_gives_the_student_t_interval_and_paired_differences():
    from lit_heads.analysis.study import paired, summary

    s = summary([0.1, 0.2, 0.3, 0.4, 0.5], ci=0.95)
    std = math.sqrt(0.025)  # sample variance of 0.1..0.5 is 0.025
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(std) and s["n"] == 5
    assert s["half_width"] == pytest.approx(2.7764451 * std / math.sqrt(5))  # t_{0.975, 4} from a table
    assert (s["low"], s["high"]) == pytest.approx((0.3 - s["half_width"], 0.3 + s["half_width"]))
    assert summary([0.5, 0.7], ci=0.9)["half_width"] == pytest.approx(6.3137515 * math.sqrt(0.02) / math.sqrt(2))
    assert "half_width" not in summary([0.5])
    d = paired([0.5, 0.6, 0.9], [0.4, 0.6, 0.6], ci=0.95)
    assert d["values"] == pytest.approx([0.1, 0.0, 0.3]) and d["mean"] == pytest.approx(0.4 / 3)
    assert d["half_width"] == pytest.approx(4.3026527 * np.std([0.1, 0.0, 0.3], ddof=1) / math.sqrt(3))


def test_mix_weights_per_arm():
    from lit_heads.analysis.study import mix_weights

    alpha, sizes = {"multistep": 0.6, "code": 0.3, "string": 0.0}, {"multistep": 400, "code": 100, "string": 500}
    assert mix_weights("ap_mix", alpha, sizes, 0) == alpha
    assert mix_weights("size_mix", alpha, sizes, 0) == {"multistep": 400.0, "code": 100.0, "string": 500.0}
    r0, r1 = mix_weights("random_mix", alpha, sizes, 0), mix_weights("random_mix", alpha, sizes, 1)
    assert set(r0) == set(sizes) and sum(r0.values()) == pytest.approx(1.0) and min(r0.values()) > 0
    assert r0 == mix_weights("random_mix", alpha, sizes, 0) and r0 != r1  # seeded, and a new draw per seed


def test_change_over_steps_ends_at_zero_distance():
    history = PatternHistory()
    final = torch.rand(3, 4)
    for step, weight in ((0, 0.0), (5, 0.5), (10, 1.0)):
        history.append(step, (1 - weight) * torch.rand(3, 4) + weight * final)
    change = change_over_steps(history)
    assert change["steps"] == [0, 5, 10]
    assert change["mse_vs_final"][-1] == 0 and change["corr_vs_final"][-1] == pytest.approx(1.0)
    assert change["mse_vs_final"][0] > change["mse_vs_final"][1] > 0


def test_config_validation_names_the_problem():
    with pytest.raises(ConfigError, match="is a basic task"):
        StudyConfig(complex_task="arithmetic").validate()
    with pytest.raises(ConfigError, match="lacks"):
        StudyConfig(basic_tasks=["arithmetic", "string"]).validate()
    with pytest.raises(ConfigError, match="two disjoint halves"):
        StudyConfig(ap_samples=1, probes=["own"]).validate()
    with pytest.raises(ConfigError, match="seeds is empty"):
        StudyConfig(seeds=[]).validate()
    with pytest.raises(ConfigError, match=r"seeds \[0, 1, 0\] repeats a seed"):
        StudyConfig(seeds=[0, 1, 0]).validate()
    with pytest.raises(ConfigError, match=r"ci=0.95 asks for a confidence interval over seeds, but seeds=\[3\] has 1; "
                                          r"a t-interval needs at least 2 seeds .* or set ci: null"):
        StudyConfig(seeds=[3]).validate()
    StudyConfig(seeds=[3], ci=None).validate()  # one seed is fine when no interval is asked for
    with pytest.raises(ConfigError, match="between 0 and 1"):
        StudyConfig(ci=95).validate()
    with pytest.raises(ConfigError, match=r"unknown probe mode\(s\) \['shared'\]; give one or more distinct modes of "
                                          r"\['own', 'complex', 'mix'\]"):
        StudyConfig(probes=["own", "shared"]).validate()
    with pytest.raises(ConfigError, match="distinct modes"):
        StudyConfig(probes=[]).validate()
    with pytest.raises(ConfigError, match=r"probe mode 'mix'.*multiple of 8"):
        StudyConfig(ap_samples=12).validate()
    with pytest.raises(ConfigError, match=r"must name exactly the basic tasks .*missing: \['string'\]"):
        StudyConfig(basic_train_sizes={"multistep": 10, "code": 10}).validate()
    with pytest.raises(ConfigError, match=r"ablate_k=\[0, 3\], ablate_seeds=\[0, 1, 2\]: .*whole number of heads >= 1"):
        StudyConfig(ablate_k=[0, 3]).validate()
    with pytest.raises(ConfigError, match=r"ablate_seeds=\[\]: .*one or more distinct seeds"):
        StudyConfig(ablate_seeds=[]).validate()
    with pytest.raises(ConfigError, match=r"ablate_mask='half'; use one of \['zero', 'mean'\]"):
        StudyConfig(ablate_mask="half").validate()
    with pytest.raises(ConfigError, match=r"'top_k': 0"):
        StudyConfig(top_k=0).validate()
    with pytest.raises(ConfigError,
                       match=r"^restricted_top_k=27, ablate_k=\[3, 9, 27\]: larger than the 24 attention "
                                          r"heads of m; every k of the study .* must be from 1 to 24\.$"):
        StudyConfig().check_heads("m", 24)
    StudyConfig().check_heads("m", 27)  # k equal to the number of heads is allowed
    with pytest.raises(ConfigError, match="model is an empty list"):
        StudyConfig(model=[]).validate()
    with pytest.raises(ConfigError, match="run folders .* collide"):
        StudyConfig(model=["smollm2-135m", "smollm2-135m"]).validate()
    with pytest.raises(DataError, match="real_data: on"):
        StudyConfig(real_data="on", shared_data="/nonexistent").use_real()
    cfg = StudyConfig().validate()
    assert cfg.components == ["multistep", "code"] and cfg.controls == ["string"]
    assert cfg.n_mix == cfg.mix_steps * cfg.batch_size
    assert cfg.models == ["smollm2-135m"] and cfg.main_probe == "own"
    assert StudyConfig(basic_train_sizes=50).train_sizes() == {"multistep": 50, "code": 50, "string": 50}


@pytest.mark.parametrize("args, message", [
    (["--probes", "[own, shared]"], "unknown probe mode(s) ['shared']"),
    (["--seeds", "[0]"], "a t-interval needs at least 2 seeds"),
])
def test_bad_study_input_exits_2_before_anything_is_written(tmp_path, capsys, args, message):
    from lit_heads.cli import main as cli_main

    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "--model", str(tmp_path / "no-such-model"), "--output", str(out), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_k_larger_than_the_heads_exits_2_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    from lit_heads import module
    from lit_heads.cli import main as cli_main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the k were checked")

    monkeypatch.setattr(module.SFTModule, "__init__", no_loading)
    out = tmp_path / "study"
    fitting = ["--top_k", "4", "--restricted_top_k", "2", "--ablate_k", "[1, 2]"]  # the tiny model has 2 x 4 heads
    for args, named in ((["--ablate_k", "[1, 9]"], "ablate_k=[1, 9]"), (["--top_k", "9"], "top_k=9"),
                        (["--restricted_top_k", "10"], "restricted_top_k=10")):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["study", "--model", str(tiny_llama_dir), "--output", str(out), *fitting, *args])
        assert exit_info.value.code == 2
        assert f"{named}: larger than the 8 attention heads of {tiny_llama_dir}" in capsys.readouterr().err
        assert not out.exists()


def test_lengths_that_would_cut_a_sample_or_an_answer_are_refused(bundled_tokenizer):
    import copy

    from lit_heads.analysis.study import generated_tasks
    from lit_heads.analysis.study.tasks import check_fits
    from lit_heads.data.collate import PromptEncoder

    cfg = StudyConfig(**TINY).validate()
    tasks = generated_tasks(cfg)
    plain = copy.deepcopy(bundled_tokenizer)
    plain.chat_template = None
    for tok in (bundled_tokenizer, plain):
        # The training encoding of every sample the study uses, at a length that cuts nothing.
        whole = PromptEncoder(tok, 10_000)
        longest = max(len(whole.encode(e)[0]["input_ids"]) for t in tasks.values()
                      for e in (*t.train, *t.heldout, *t.causal))
        answer = max(len(whole.encode(e)[0]["input_ids"]) - len(whole.prompt_ids(e))
                     for e in tasks["multistep_code"].heldout[: cfg.eval_samples])
        fits = StudyConfig(**{**TINY, "max_length": longest, "max_new_tokens": answer})
        assert check_fits(fits, tasks, PromptEncoder(tok, longest), "m") == {"longest_sample": longest,
                                                                            "longest_answer": answer}
        with pytest.raises(ConfigError, match=rf"max_length={longest - 1} would cut .* needs {longest} tokens"):
            check_fits(StudyConfig(**{**TINY, "max_length": longest - 1}), tasks, PromptEncoder(tok, longest - 1), "m")
        with pytest.raises(ConfigError,
                           match=rf"max_new_tokens={answer - 1} would cut graded answers of multistep_code "
                                              rf"for m .*Set max_new_tokens: {answer} or more"):
            check_fits(StudyConfig(**{**TINY, "max_new_tokens": answer - 1}), tasks, PromptEncoder(tok, 10_000), "m")
        if tok is bundled_tokenizer:
            with_template = longest
    assert longest < with_template  # no chat template, no system prompt: the same samples are shorter


def test_causal_check_masks_what_each_ranking_and_seed_choose(tiny_llama_dir):
    from lit_heads.analysis.study import StudyRunner, causal_check, generated_tasks, rankings
    from lit_heads.analysis.study.causal import n_evaluations, passes
    from lit_heads.heads.ablation import HeadMask, head_output_means

    cfg = StudyConfig(model=str(tiny_llama_dir), **TINY).validate()
    runner = StudyRunner(cfg)
    task = generated_tasks(cfg)["multistep_code"]
    before, after = torch.rand(2, 4), torch.rand(2, 4)
    scores = rankings({"full": before}, {"full": after})
    assert torch.equal(scores["abs_delta"], (after - before).abs()) and torch.equal(scores["ap"], after)
    out = causal_check(runner, task, scores)
    assert len(out["rankings"]["ap"]["rows"]) + 2 * 2 + 1 == n_evaluations([1, 2], [0, 1]) == 1 + 2 * (2 + 4)
    batches = list(runner.ap_data.make_dataloader(task.causal))
    means = head_output_means(runner.module.model, batches)
    for name, pattern in scores.items():
        order = [divmod(i, 4) for i in torch.argsort(pattern.flatten(), descending=True, stable=True).tolist()]
        for row in out["rankings"][name]["rows"]:
            if row["selection"] == "random":
                continue
            expected = order[: row["k"]] if row["selection"] == "top" else order[::-1][: row["k"]]
            assert sorted(map(tuple, row["heads"])) == sorted(expected)
            with HeadMask(runner.module.model, expected, mode="mean", means=means):
                assert row["loss"] == pytest.approx(runner.module.evaluate_loss(batches), rel=1e-5)
    assert out["base"]["loss"] == pytest.approx(runner.module.evaluate_loss(batches), rel=1e-5)
    summary = [{"k": 1, "top": {"loss_increase": {"mean": 0.3}},
                "random": {"loss_increase": {"mean": 0.1, "max": 0.4}}},
               {"k": 2, "top": {"loss_increase": {"mean": 0.5}},
                "random": {"loss_increase": {"mean": 0.2, "max": 0.3}}}]
    verdict = passes(summary)
    assert verdict["all"] and [v["above_every_seed"] for v in verdict["per_k"]] == [False, True]
    assert verdict["per_k"][0]["top_minus_random"] == pytest.approx(0.2)
    summary[1]["top"]["loss_increase"]["mean"] = 0.1
    assert not passes(summary)["all"]


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_device_is_checked_before_anything_loads(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"device='cuda', but CUDA is not available here .*use device: cpu"):
        StudyConfig(device="cuda").validate()
    with pytest.raises(ConfigError, match=r"device='gpu0' is not a device name; use 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        StudyConfig(device="gpu0").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    # A bare 'cuda' is the first GPU, so Lightning's device and the one scoring and generation use agree.
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\): use one of cuda:0 to cuda:1, or cpu"):
        resolve_device("cuda:2")


def test_trainer_gets_the_configured_device():
    assert trainer_device(torch.device("cpu")) == {"accelerator": "cpu", "devices": 1}
    assert trainer_device(torch.device("cuda", 1)) == {"accelerator": "cuda", "devices": [1]}
    assert trainer_device(torch.device("mps")) == {"accelerator": "mps", "devices": 1}


def test_unavailable_device_exits_2_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from lit_heads.cli import main as cli_main

    _no_cuda(monkeypatch)
    out = tmp_path / "study"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "--model", str(tmp_path / "no-such-model"), "--device", "cuda", "--output", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "device='cuda', but CUDA is not available" in err and "use device: cpu" in err
    assert not out.exists()  # refused before any folder is made or model is looked for


def test_budget_grows_with_the_work_and_profiles_fit_their_limits():
    import yaml

    default = StudyConfig(**yaml.safe_load((ROOT / "configs" / "study.yaml").read_text())).validate()
    quick = StudyConfig(**yaml.safe_load((ROOT / "configs" / "study_quick.yaml").read_text())).validate()
    assert default.real_data == "off"  # the real tasks would take the default profile past its hour
    # The recipe and the dataclass's defaults are one profile: a bare `lit_heads study` runs it too.
    assert default == StudyConfig()
    assert plan_budget(default, real=False)["eta_s"] <= 60 * 60
    assert plan_budget(quick, real=False)["eta_s"] <= 3 * 60
    more = StudyConfig(**{**default.__dict__, "seeds": [*default.seeds, 99]})
    per_seed = (len(ARMS) - 1) * (default.mix_steps + default.complex_steps)  # every trained arm, one more seed
    assert plan_budget(more, True)["sft_steps"] == plan_budget(default, True)["sft_steps"] + per_seed
    assert (plan_budget(more, True)["generated_answers"]
            == plan_budget(default, True)["generated_answers"] + (len(ARMS) - 1) * default.eval_samples)
    assert plan_budget(default, True)["eta_s"] > plan_budget(default, False)["eta_s"]
    budget = plan_budget(default, True)
    assert sum(budget["stages"].values()) == budget["eta_s"] and set(budget["stages"]) >= {"finding1", "application",
                                                                                           "real"}
    # The causal check: one loss over the samples per evaluation (1 unmasked, per k the random seeds and the
    # top and bottom of 2 rankings), plus the forward pass of the mean ablation's means.
    evaluations = 1 + len(default.ablate_k) * (len(default.ablate_seeds) + 4)
    assert budget["loss_samples"] == (evaluations + 1) * default.ablate_samples
    assert budget["stages"]["ablation"] == round(budget["loss_samples"] * default.sec_per_loss_sample)
    # A model with twice the compute per token plans every unit twice as long (rounded per stage).
    double = plan_budget(default, True, scale=2.0)
    assert all(abs(double["stages"][k] - 2 * v) <= 1 for k, v in budget["stages"].items())
    assert double["sft_steps"] == budget["sft_steps"] and double["scale"] == 2.0


def test_model_shape_reads_heads_and_compute_from_the_config_alone(tiny_llama_dir):
    from torch import nn

    from lit_heads.analysis.study.config import REFERENCE_MATMUL_WEIGHTS, model_shape
    from lit_heads.models import load_model

    model = load_model(str(tiny_llama_dir))
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert model_shape(str(tiny_llama_dir)) == {"heads": 2 * 4, "matmul_weights": linear}
    # The reference is SmolLM2-135M's count: 30 layers of q, k, v, o (576x576, 2x 576x192, 576x576) and the
    # gated MLP (3x 576x1536), plus the output head (49152 x 576).
    assert REFERENCE_MATMUL_WEIGHTS == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576


def test_probe_modes_cost_what_they_score():
    from lit_heads.analysis.study.budget import distinct_probes

    # 4 tasks: the base model scores each own probe and the mix once ('complex' is the complex task's own
    # probe); each fine-tuned model scores its own, the complex one (unless it is its own) and the mix.
    assert distinct_probes(StudyConfig(probes=["own", "complex", "mix"])) == (5, 4 + 3 + 4)
    assert distinct_probes(StudyConfig(probes=["own"])) == (4, 4)
    assert distinct_probes(StudyConfig(probes=["complex", "mix"])) == (2, 8)
    one = plan_budget(StudyConfig(probes=["own"]), False)["ap_samples"]
    three = plan_budget(StudyConfig(probes=["own", "complex", "mix"]), False)["ap_samples"]
    assert three - one == (1 + 7) * StudyConfig().ap_samples


def test_clock_re_estimates_the_time_left_from_the_pace(monkeypatch, capsys):
    from lit_heads.analysis.study import budget

    now = [0.0]
    monkeypatch.setattr(budget.time, "perf_counter", lambda: now[0])
    clock = budget.Clock(400, {"base": 20, "finding1": 80, "application": 300})
    now[0] = 10.0  # a stage too small to judge the pace by
    clock.lap("base")
    assert clock.left_s() is None and "left" not in capsys.readouterr().out
    now[0] = 10.0 + 160.0  # finding 1 took twice its plan, so the rest should too
    clock.lap("finding1")
    assert clock.left_s() == pytest.approx(170 / 100 * 300)
    assert "finding 1 (patterns before/after SFT, every probe) done in 160 s" in capsys.readouterr().out


def _check_outputs(out: Path, cfg: dict) -> dict:
    results = json.loads((out / "results.json").read_text())
    f2 = results["finding2"]
    for method in ("lstsq", "nnls"):
        assert set(f2["main"][method]["alpha"]) == set(StudyConfig(**cfg).components)
        assert -math.inf < f2["main"][method]["r2"] <= 1.0 + 1e-9
    assert min(f2["main"]["nnls"]["alpha"].values()) >= 0
    probes = cfg.get("probes", ["own", "complex", "mix"])
    assert f2["probe"] == probes[0] and list(results["probes"]) == probes
    for fits in results["probes"].values():
        assert -math.inf < fits["main"]["cross_half_r2"] <= 1.0 and -math.inf < fits["noise_ceiling_r2"] <= 1.0
        assert len(fits["controls"]) == 3  # the control swapped for each of the 2 components, and alone
    app = results["application"]
    assert set(app["alpha"]) == set(cfg["basic_tasks"])
    acc = app["accuracy"]
    assert set(acc) == set(ARMS)
    assert all(0.0 <= v <= 1.0 for arm in acc.values() for v in arm["values"])
    assert all(len(acc[a]["values"]) == len(cfg["seeds"]) for a in ARMS[1:])
    for arm in MIX_ARMS:
        assert len(app["mix_counts"][arm]) == len(cfg["seeds"])
        assert all(sum(c.values()) == app["n_mix"] for c in app["mix_counts"][arm])
        assert len((out / "mix" / f"{arm}.jsonl").read_text().splitlines()) == app["n_mix"]
    assert app["steps"]["complex_only"] == app["steps"]["mix"] + app["steps"]["complex"]
    diff = app["paired"]["ap_mix - random_mix"]
    assert diff["values"] == pytest.approx([a - r for a, r in zip(acc["ap_mix"]["values"],
                                                                  acc["random_mix"]["values"])])
    f1 = results["finding1"]
    n_tasks = len(cfg["basic_tasks"]) + 1
    assert np.asarray(f1["similarity"]["delta_corr"]["matrix"]).shape == (n_tasks, n_tasks)
    for task in f1["tasks"]:
        for when in ("before", "after"):
            assert 0 <= f1["concentration"][task][when]["gini"] < 1
        assert (out / "patterns" / f"{task}_delta.safetensors").is_file()
    over = results["finding3"]["over_steps"]
    assert over["steps"][0] == 0 and over["steps"][-1] == cfg["sft_steps"] and over["mse_vs_final"][-1] == 0
    ablation = results["ablation"]
    ks, seeds = sorted(set(cfg["ablate_k"])), cfg["ablate_seeds"]
    assert set(ablation["rankings"]) == {"ap", "abs_delta"} and ablation["k"] == ks
    random_rows = [[(r["seed"], r["k"], r["heads"]) for r in ranking["rows"] if r["selection"] == "random"]
                   for ranking in ablation["rankings"].values()]
    assert random_rows[0] == random_rows[1] and len(random_rows[0]) == len(ks) * len(seeds)  # shared random heads
    for ranking in ablation["rankings"].values():
        assert len(ranking["rows"]) == len(ks) * (len(seeds) + 2)
        for row in ranking["rows"]:
            assert row["loss_increase"] == pytest.approx(row["loss"] - ablation["base"]["loss"])
            assert len(row["heads"]) == row["k"]
        assert [e["k"] for e in ranking["summary"]] == ks and [v["k"] for v in ranking["passes"]["per_k"]] == ks
    for fig in ("patterns", "similarity_delta", "residual", "pattern_change", "application", "ablation_ap",
                "ablation_abs_delta"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    for paper_number in ("0.97", "0.95", "0.50 → 0.33", "28.68", "36.82", "52.33"):
        assert paper_number in report
    assert "Where ours differ" in report
    assert "Noise ceiling**, defined" in report and "Which probe the paper's description matches" in report
    assert "size-weighted mix → complex" in report and "| AP-guided − random mix |" in report
    assert "## Causal check" in report and "### Ranked by |ΔAP| (after − before SFT)" in report
    assert f"unmasked: {results['ablation']['base']['loss']:.4f}" in report
    assert PAPER["application_math_benchmark"]["Llama3-8B"] == [46.12, 49.22, 50.10, 52.33]
    return results


TINY = dict(basic_tasks=["multistep", "code", "string"], complex_task="multistep_code", real_data="off", max_length=208,
            batch_size=2, warmup_steps=1, ap_samples=8, ap_batch_size=4, sft_steps=2, top_k=4, track_every=1,
            track_samples=2, restricted_top_k=2, restricted_random=True, eval_samples=2, max_new_tokens=64,
            complex_train_size=4, mix_steps=1, complex_steps=1,
            basic_train_sizes={"multistep": 40, "code": 20, "string": 10},
            seeds=[0, 1], ablate_k=[1, 2], ablate_seeds=[0, 1], ablate_samples=3, progress_bar=False)


def test_runner_restarts_every_arm_from_the_base_weights(tiny_llama_dir):
    from lit_heads.analysis.study import StudyRunner, generated_tasks

    cfg = StudyConfig(model=str(tiny_llama_dir), **TINY).validate()
    runner = StudyRunner(cfg)
    base = {k: v.clone() for k, v in runner.module.model.state_dict().items()}
    tasks = generated_tasks(cfg)
    complex_task = tasks["multistep_code"]
    parts = [{e.prompt for e in part} for part in (complex_task.train, complex_task.heldout, complex_task.causal)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(complex_task.causal) == TINY["ablate_samples"]
    assert all(not t.causal for t in tasks.values() if t.kind == "basic")
    assert runner.state == "base"
    runner.train(tasks["multistep"].train[:4], 2, seed=0, label="trained")
    assert runner.state == "trained"
    assert any(not torch.equal(base[k], v) for k, v in runner.module.model.state_dict().items())
    runner.reset()
    assert runner.state == "base"
    assert all(torch.equal(base[k], v) for k, v in runner.module.model.state_dict().items())
    halves = runner.halves(tasks["code"].heldout[:4])
    # The whole set's AP is the mean of its two equal halves (AP is a per-sample mean).
    assert torch.allclose(halves["full"], (halves["a"] + halves["b"]) / 2)
    assert 0.0 <= runner.accuracy(tasks["multistep_code"].heldout[:2]) <= 1.0


@pytest.mark.slow  # two whole fits
def test_a_finished_training_run_leaves_no_optimizer_state_behind(tiny_llama_dir, monkeypatch):
    """Each run's trainer and AdamW state are freed when the run ends, not whenever Python's cycle
    collector gets to them: the default study's application stage trains 35 times in one process."""
    import gc
    import weakref

    from lit_heads.analysis.study import StudyRunner, generated_tasks

    cfg = StudyConfig(model=str(tiny_llama_dir), **TINY).validate()
    runner = StudyRunner(cfg)
    examples = generated_tasks(cfg)["multistep"].train[:4]
    created: list[weakref.ref] = []
    adamw = torch.optim.AdamW

    def tracked_adamw(*args, **kwargs):
        optimizer = adamw(*args, **kwargs)
        created.append(weakref.ref(optimizer))
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", tracked_adamw)  # train() builds its factory from torch.optim.AdamW
    gc.disable()  # no collection that merely happens to run may free it
    try:
        for seed in range(2):
            runner.reset()
            runner.train(examples, 2, seed=seed)
            assert len(created) == seed + 1 and all(ref() is None for ref in created), seed
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_trains_scores_and_generates_on_the_configured_gpu(tiny_llama_dir):
    from lit_heads.analysis.study import StudyRunner, generated_tasks

    cfg = StudyConfig(model=str(tiny_llama_dir), device="cuda", **TINY).validate()
    runner = StudyRunner(cfg)
    tasks = generated_tasks(cfg)
    runner.train(tasks["multistep"].train[:4], 2, seed=0)
    # Lightning's teardown moves the module to the CPU; the runner must bring it back.
    assert {p.device for p in runner.module.parameters()} == {torch.device("cuda", 0)}
    runner.reset()
    assert {p.device for p in runner.module.parameters()} == {torch.device("cuda", 0)}
    assert torch.isfinite(runner.halves(tasks["code"].heldout[:4])["full"]).all()
    assert 0.0 <= runner.accuracy(tasks["multistep_code"].heldout[:2]) <= 1.0


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory, bundled_tokenizer):
    """A second family next to tiny_llama_dir: a 2-layer Gemma (one KV head, head_dim 16) whose tokenizer has
    no chat template, as Gemma 3 270M's has none (prompts are plain 'prompt\\n', responses end with EOS)."""
    import copy

    from tiny_models import tiny_model

    path = tmp_path_factory.mktemp("tiny-gemma")
    tok = copy.deepcopy(bundled_tokenizer)
    tok.chat_template = None
    model = tiny_model("gemma", attn_implementation="sdpa", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_whole_study_on_two_tiny_models_side_by_side(tiny_llama_dir, tiny_gemma_dir, tmp_path, capsys):
    from lit_heads.cli import main as cli_main

    out = tmp_path / "study"
    args = ["study", "--model", json.dumps([str(tiny_llama_dir), str(tiny_gemma_dir)]), "--output", str(out)]
    for key, value in TINY.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, bool, dict)) else str(value)]
    cli_main(args)
    printed = capsys.readouterr().out
    # Both plans and the total come first, before any model loads.
    assert printed.index(f"plan for {tiny_gemma_dir}") < printed.index("2 models, "
                                                                       "estimated") < printed.index("[study] SFT on")
    for model_dir in (tiny_llama_dir, tiny_gemma_dir):
        results = _check_outputs(out / model_dir.name, TINY)
        assert {k: results["model"][k] for k in ("name", "layers", "heads")} == {"name": str(model_dir), "layers": 2,
                                                                              "heads": 4}
        # Gemma 3's tokenizer has no chat template: the study must run on plain prompts too.
        assert results["model"]["chat_template"] is (model_dir == tiny_llama_dir)
        restricted = results["finding3"]["restricted"]
        assert set(restricted["arms"]) == {"top", "random"}
        assert all(0 < a["trainable_fraction"] < 0.5 and len(a["heads"]) == 2 for a in restricted["arms"].values())
        assert results["application"]["pool_sizes"] == TINY["basic_train_sizes"]
    side = (out / "report.md").read_text()
    llama = json.loads((out / tiny_llama_dir.name / "results.json").read_text())
    gemma = json.loads((out / tiny_gemma_dir.name / "results.json").read_text())
    r2 = f"{llama['finding2']['main']['lstsq']['r2']:.3f} | {gemma['finding2']['main']['lstsq']['r2']:.3f}"
    assert f"| Finding 2: composition R² (main probe) | 0.97 (math + code), 0.95 | {r2} |" in side
    assert f"| {tiny_llama_dir.name} (2×4 heads) | {tiny_gemma_dir.name} (2×4 heads) |" in side
    assert "probe (c) a fixed mix of all tasks' held-out data" in side and "The runs differ" not in side
    assert "| Causal check, ranked by AP after SFT: top-k − random-k loss increase | — |" in side

    # The same table from the two finished folders, without training anything.
    again = tmp_path / "combined"
    cli_main(["study", "--combine", json.dumps([str(out / d.name) for d in (tiny_llama_dir, tiny_gemma_dir)]),
              "--output", str(again)])
    assert (again / "report.md").read_text() == side
    # A folder from a run that did not finish is refused before anything is written.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "results.json").write_text(json.dumps({**llama, "complete": False}))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["study", "--combine", json.dumps([str(out / tiny_llama_dir.name), str(unfinished)]),
                  "--output", str(tmp_path / "refused")])
    assert exit_info.value.code == 2 and "did not finish" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(os.environ.get("LIT_HEADS_REAL_STUDY") != "1",
                    reason="3+ minutes on 2 cores, over CI's 20-minute budget: LIT_HEADS_REAL_STUDY=1 runs it "
                           "(every stage also runs in CI on two tiny models: test_whole_study_on_two_tiny_models)")
def test_quick_profile_on_the_bundled_model(tmp_path):
    import yaml

    from lit_heads.commands.study import main

    cfg = yaml.safe_load((ROOT / "configs" / "study_quick.yaml").read_text())
    out = tmp_path / "quick"
    main(["--config", str(ROOT / "configs" / "study_quick.yaml"), "--output", str(out)])
    results = _check_outputs(out, cfg)
    assert results["model"]["layers"] == 30 and results["model"]["heads"] == 9


def test_study_package_imports_flow_one_way():
    """No import cycle inside the study package, counting imports inside functions and under
    TYPE_CHECKING too: each module may import only modules listed before it in the package docstring."""
    import ast

    import lit_heads.analysis.study as package

    folder = Path(package.__file__).parent
    listing = package.__doc__.split("each imports only those above it):")[1]
    order = [line.split()[0] for line in listing.strip().splitlines()]
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert sorted(order) == modules  # the docstring lists every module once
    prefix = "lit_heads.analysis.study."
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text())
        names = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        names += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        imported = {n[len(prefix):].split(".")[0] for n in names if n.startswith(prefix)}
        later = {m for m in imported if order.index(m) >= order.index(name)}
        assert not later, f"{name} imports {later}, which come after it"
    # The old modules would be shadowed by the package (study.py) or revive the cycle (study_report.py).
    assert not (folder.parent / "study_report.py").exists() and not (folder.parent / "study.py").exists()


def test_an_accuracy_of_one_run_is_shown_without_a_spread():
    from lit_heads.analysis.study.measures import summary
    from lit_heads.analysis.study.report import _pct

    assert _pct(summary([0.25])) == "25.0"  # one seed (or the base model): no spread to show
    assert _pct(summary([0.25, 0.75])) == f"50.0 ± {100 * math.sqrt(0.125):.1f}"  # sample std without a CI
    with_ci = summary([0.25, 0.75], 0.95)
    assert _pct(with_ci) == f"50.0 ± {100 * with_ci['half_width']:.1f}" and with_ci["half_width"] > math.sqrt(0.125)


def test_side_by_side_names_every_profile_field_on_which_the_runs_differ(tmp_path):
    from lit_heads.analysis.study import write_side_by_side

    # The two committed runs the README compares: same profile, so no warning.
    docs = Path(__file__).resolve().parents[1] / "docs" / "study"
    smol = json.loads((docs / "results.json").read_text())
    gemma = json.loads((docs / "gemma3-270m" / "results.json").read_text())
    assert "The runs differ" not in write_side_by_side(tmp_path / "same", {"a": smol, "b": gemma}).read_text()

    # A profile change is named with each run's value; where it ran and the time estimates are not a profile.
    older = {**gemma, "config": {**gemma["config"], "batch_size": 4, "mix_steps": 12, "sec_per_step": 9.0,
                                 "output": "elsewhere", "device": "cuda"}}
    text = write_side_by_side(tmp_path / "differ", {"a": smol, "b": older}).read_text()
    assert ("**The runs differ in their profiles**, so their columns are not a like-for-like comparison: "
            "`batch_size` (2, 4); `mix_steps` (8, 12), in the order of the columns.") in text
    assert "sec_per_step" not in text and "`device`" not in text
