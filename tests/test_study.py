"""The study pipeline: its analysis helpers on patterns with known answers, the whole pipeline on a
tiny model (seconds), and the CI profile on the real bundled model (integration)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_heads.analysis.study import (
    ARMS, PAPER, StudyConfig, change_over_steps, composition, plan_budget, resolve_device, similarity, specificity,
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
    assert m[0, 2] == pytest.approx(0.5 * (stats.pearson(halves["x"]["a"], halves["y"]["b"]) + stats.pearson(halves["x"]["b"], halves["y"]["a"])))
    assert np.allclose(m, m.T)
    assert m[0, 1] > 0.9 and abs(m[0, 2]) < 0.6  # same signal ~ noise floor; different signal far below
    spec = specificity(m.tolist(), list(halves))
    assert spec["within_mean"] == pytest.approx(np.mean(np.diag(m)))
    assert spec["per_task"]["y"]["between_mean"] == pytest.approx((m[2, 0] + m[2, 1]) / 2)


def test_composition_recovers_exact_alpha_and_control_fits_worse():
    rng = torch.Generator().manual_seed(1)
    a, c, s = (torch.rand(8, 6, generator=rng) for _ in range(3))
    deltas = {"arithmetic": {"full": a}, "code": {"full": c}, "string": {"full": s}}
    target = {"full": 0.6 * a + 0.4 * c, "a": 0.6 * a + 0.4 * c, "b": 0.6 * a + 0.4 * c + 0.01}
    out = composition(target, deltas, ["arithmetic", "code"], ["string"])
    for method in ("lstsq", "nnls"):
        assert out["main"][method]["alpha"] == pytest.approx({"arithmetic": 0.6, "code": 0.4}, abs=1e-5)
        assert out["main"][method]["r2"] == pytest.approx(1.0, abs=1e-6)
    assert set(out["controls"]) == {"string+code (string instead of arithmetic)", "arithmetic+string (string instead of code)", "string alone"}
    assert all(fits["lstsq"]["r2"] < 0.999 for fits in out["controls"].values())
    assert set(out["all_basic"]["nnls"]["alpha"]) == {"arithmetic", "code", "string"}
    assert out["all_basic"]["nnls"]["alpha"]["string"] == pytest.approx(0.0, abs=1e-5)
    assert np.asarray(out["residual"]).shape == (8, 6)
    assert 0.9 < out["noise_ceiling_r2"] <= 1.0


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
        StudyConfig(ap_samples=1).validate()
    with pytest.raises(ConfigError, match="seeds is empty"):
        StudyConfig(seeds=[]).validate()
    with pytest.raises(DataError, match="real_data: on"):
        StudyConfig(real_data="on", shared_data="/nonexistent").use_real()
    cfg = StudyConfig().validate()
    assert cfg.components == ["arithmetic", "code"] and cfg.controls == ["string"]
    assert cfg.n_mix == cfg.mix_steps * cfg.batch_size


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
    assert plan_budget(default, real=True)["eta_s"] <= 60 * 60
    assert plan_budget(quick, real=False)["eta_s"] <= 4 * 60
    more = StudyConfig(**{**default.__dict__, "seeds": [0, 1, 2, 3]})
    assert plan_budget(more, True)["sft_steps"] == plan_budget(default, True)["sft_steps"] + 3 * (default.mix_steps + default.complex_steps)
    assert plan_budget(default, True)["eta_s"] > plan_budget(default, False)["eta_s"]


def _check_outputs(out: Path, cfg: dict) -> dict:
    results = json.loads((out / "results.json").read_text())
    f2 = results["finding2"]
    for method in ("lstsq", "nnls"):
        assert set(f2["main"][method]["alpha"]) == set(StudyConfig(**cfg).components)
        assert -math.inf < f2["main"][method]["r2"] <= 1.0 + 1e-9
    assert min(f2["main"]["nnls"]["alpha"].values()) >= 0
    assert set(results["application"]["alpha"]) == set(cfg["basic_tasks"])
    acc = results["application"]["accuracy"]
    assert set(acc) == set(ARMS)
    assert all(0.0 <= v <= 1.0 for arm in acc.values() for v in arm["values"])
    assert all(len(acc[a]["values"]) == len(cfg["seeds"]) for a in ARMS[1:])
    counts = results["application"]["ap_mix_counts"]
    assert sum(counts.values()) == results["application"]["n_mix"]
    mix_lines = (out / "mix" / "ap_mix.jsonl").read_text().splitlines()
    assert len(mix_lines) == results["application"]["n_mix"]
    f1 = results["finding1"]
    n_tasks = len(cfg["basic_tasks"]) + 1
    assert np.asarray(f1["similarity"]["delta_corr"]["matrix"]).shape == (n_tasks, n_tasks)
    for task in f1["tasks"]:
        for when in ("before", "after"):
            assert 0 <= f1["concentration"][task][when]["gini"] < 1
        assert (out / "patterns" / f"{task}_delta.safetensors").is_file()
    over = results["finding3"]["over_steps"]
    assert over["steps"][0] == 0 and over["steps"][-1] == cfg["sft_steps"] and over["mse_vs_final"][-1] == 0
    for fig in ("patterns", "similarity_delta", "residual", "pattern_change", "application"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    for paper_number in ("0.97", "0.95", "0.50 → 0.33", "28.68", "36.82", "52.33"):
        assert paper_number in report
    assert "Where ours differ" in report
    assert PAPER["application_math_benchmark"]["Llama3-8B"] == [46.12, 49.22, 50.10, 52.33]
    return results


TINY = dict(basic_tasks=["arithmetic", "code", "string"], complex_task="math_code", real_data="off", max_length=128,
            batch_size=2, warmup_steps=1, ap_samples=4, ap_batch_size=4, sft_steps=2, top_k=4, track_every=1,
            track_samples=2, restricted_top_k=2, restricted_random=True, eval_samples=2, max_new_tokens=4,
            complex_train_size=4, mix_steps=1, complex_steps=1, seeds=[0, 1], progress_bar=False)


def test_runner_restarts_every_arm_from_the_base_weights(tiny_llama_dir):
    from lit_heads.analysis.study import StudyRunner, generated_tasks

    cfg = StudyConfig(model=str(tiny_llama_dir), **TINY).validate()
    runner = StudyRunner(cfg)
    base = {k: v.clone() for k, v in runner.module.model.state_dict().items()}
    tasks = generated_tasks(cfg)
    assert not {e.prompt for e in tasks["math_code"].train} & {e.prompt for e in tasks["math_code"].heldout}
    runner.train(tasks["arithmetic"].train[:4], 2, seed=0)
    assert any(not torch.equal(base[k], v) for k, v in runner.module.model.state_dict().items())
    runner.reset()
    assert all(torch.equal(base[k], v) for k, v in runner.module.model.state_dict().items())
    halves = runner.halves(tasks["code"].heldout[:4])
    # The whole set's AP is the mean of its two equal halves (AP is a per-sample mean).
    assert torch.allclose(halves["full"], (halves["a"] + halves["b"]) / 2)
    assert 0.0 <= runner.accuracy(tasks["math_code"].heldout[:2]) <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_runner_trains_scores_and_generates_on_the_configured_gpu(tiny_llama_dir):
    from lit_heads.analysis.study import StudyRunner, generated_tasks

    cfg = StudyConfig(model=str(tiny_llama_dir), device="cuda", **TINY).validate()
    runner = StudyRunner(cfg)
    tasks = generated_tasks(cfg)
    runner.train(tasks["arithmetic"].train[:4], 2, seed=0)
    # Lightning's teardown moves the module to the CPU; the runner must bring it back.
    assert {p.device for p in runner.module.parameters()} == {torch.device("cuda", 0)}
    runner.reset()
    assert {p.device for p in runner.module.parameters()} == {torch.device("cuda", 0)}
    assert torch.isfinite(runner.halves(tasks["code"].heldout[:4])["full"]).all()
    assert 0.0 <= runner.accuracy(tasks["math_code"].heldout[:2]) <= 1.0


def test_whole_study_on_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    from lit_heads.cli import main as cli_main

    out = tmp_path / "study"
    args = ["study", "--model", str(tiny_llama_dir), "--output", str(out)]
    for key, value in TINY.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, (list, bool)) else str(value)]
    cli_main(args)
    results = _check_outputs(out, TINY)
    assert results["model"] == {"name": str(tiny_llama_dir), "layers": 2, "heads": 4}
    restricted = results["finding3"]["restricted"]
    assert set(restricted["arms"]) == {"top", "random"}
    assert all(0 < a["trainable_fraction"] < 0.5 and len(a["heads"]) == 2 for a in restricted["arms"].values())
    assert "estimated" in capsys.readouterr().out  # the ETA is printed up front


@pytest.mark.integration
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
