"""LoRAFinetuning (PEFT) on tiny models: exact counts, frozen base, merged export, AP through the
wrapper, checkpoints and resume, and option errors."""

from __future__ import annotations

import copy
import functools
import json
import logging
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from conftest import monitored_overrides
from lit_heads.callbacks.export import ExportHF
from lit_heads.callbacks.head_restricted import HeadRestrictedFinetuning
from lit_heads.callbacks.lora import LoRAFinetuning, lora_from_checkpoint, resolve_targets, unwrap_peft
from lit_heads.checkpoint_io import CheckpointSafety
from lit_heads.cli import main
from lit_heads.data import SFTDataModule
from lit_heads.errors import ConfigError, ModelError
from lit_heads.heads.history import PatternHistory
from lit_heads.heads.layout import find_heads
from lit_heads.heads.scoring import HeadGateCapture, compute_ap, per_sample_scale
from lit_heads.module import SFTModule, model_size, response_loss
from tiny_models import sft_batch, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = dict(train_size=8, val_size=4, max_length=128, batch_size=4, seed=3)


def lora_count(model, names, r) -> int:
    """r x (in + out) per adapted layer, from the layers' own shapes (Conv1D stores weight [in, out])."""
    layers = dict(model.named_modules())
    total = 0
    for n in names:
        weight = layers[n].weight
        total += r * (weight.shape[0] + weight.shape[1])
    return total


def attention_linears(arch) -> list[str]:
    """The default targets written out by hand per architecture (independent of resolve_targets)."""
    per_layer = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}[arch]
    prefix = {"llama": "model.layers.{}.self_attn.", "gpt2": "transformer.h.{}.attn."}[arch]
    return [prefix.format(i) + n for i in range(2) for n in per_layer]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_trainable_count_is_peft_own_and_r_times_in_plus_out(arch):
    model = tiny_model(arch)
    base_size = sum(p.numel() for p in model.parameters())
    expected = attention_linears(arch)
    assert resolve_targets(model, None) == expected  # GPT-2: attn.c_proj only, not mlp.c_proj
    independent = lora_count(model, expected, r=3)
    callback = LoRAFinetuning(r=3)
    wrapped = callback.wrap(model)
    assert wrapped.get_nb_trainable_parameters()[0] == independent
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == independent
    assert model_size(wrapped) == base_size  # adapters are not part of the model's size
    assert sorted(n for n, m in unwrap_peft(wrapped).named_modules() if isinstance(m, LoraLayer)) == sorted(expected)


def test_explicit_targets_and_all_linear():
    model = tiny_model("llama")
    assert resolve_targets(model, ["q_proj", "self_attn.v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    every = resolve_targets(model, ["all-linear"])
    assert len(every) == 2 * 7 and "lm_head" not in every  # q k v o gate up down per layer
    assert LoRAFinetuning(r=2, targets="q_proj, v_proj").targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kwargs, needle", [
    ({"r": 0}, "r must be an integer >= 1"),
    ({"r": 2.5}, "r must be an integer >= 1"),
    ({"alpha": 0}, "alpha must be a number > 0"),
    ({"dropout": 1.0}, "dropout must be >= 0 and < 1"),
    ({"targets": []}, "targets must be non-empty"),
    ({"targets": ["all-linear", "q_proj"]}, "give it alone"),
])
def test_option_errors(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        LoRAFinetuning(**kwargs)


def test_missing_peft_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'peft>=0.21'"):
        LoRAFinetuning(r=4)


def test_unknown_target_lists_the_linear_layers():
    with pytest.raises(ConfigError) as err:
        resolve_targets(tiny_model("llama"), ["q_proj", "query"])
    message = str(err.value)
    assert "'query' is not a linear layer" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message
    with pytest.raises(ConfigError, match="'mlp' is not a linear layer"):  # a module, but not a linear one
        resolve_targets(tiny_model("llama"), ["mlp"])


# ---- activation patterns through the wrapper ------------------------------------------------------
def test_ap_of_a_zero_b_peft_model_equals_the_plain_model():
    batch = [sft_batch(seed=1)]
    plain = compute_ap(tiny_model("llama"), batch, progress=False).scores
    wrapped = LoRAFinetuning(r=4).wrap(tiny_model("llama"))  # B = 0: the same function as the base model
    layout = find_heads(unwrap_peft(wrapped))
    assert all(isinstance(layer.o_proj, LoraLayer) for layer in layout.layers)  # hooks sit on the PEFT layer
    torch.testing.assert_close(compute_ap(unwrap_peft(wrapped), batch, progress=False).scores, plain, rtol=1e-6, atol=0)


def test_ap_of_a_trained_peft_model_equals_its_merged_model():
    batch = [sft_batch(seed=2)]
    wrapped = LoRAFinetuning(r=4).wrap(tiny_model("llama"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    ap = compute_ap(unwrap_peft(wrapped), batch, progress=False).scores
    merged = compute_ap(wrapped.merge_and_unload(), batch, progress=False).scores
    assert not torch.allclose(ap, compute_ap(tiny_model("llama"), batch, progress=False).scores, rtol=1e-3)
    torch.testing.assert_close(ap, merged, rtol=1e-4, atol=1e-7)


def test_free_capture_on_a_training_backward_equals_compute_ap():
    """What HeadActivationMonitor(free=True) does in a LoRA fit: hooks on the training forward/backward."""
    batch = sft_batch(seed=4)
    wrapped = LoRAFinetuning(r=4, targets=["q_proj", "o_proj"]).wrap(tiny_model("llama"))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    wrapped.train()
    with HeadGateCapture(unwrap_peft(wrapped)) as capture:
        logits = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        response_loss(logits, batch["labels"]).backward()
        free = capture.pop(scale=per_sample_scale(batch["labels"])).abs().mean(0)
    probe = compute_ap(unwrap_peft(wrapped), [batch], progress=False).scores
    torch.testing.assert_close(free, probe, rtol=1e-4, atol=1e-7)


# ---- real fits ------------------------------------------------------------------------------------
class NoShuffle(SFTDataModule):
    def train_dataloader(self):
        self._ensure_setup()
        return self._loader(self._train_data, shuffle=False)


class Inspect(L.Callback):
    """The model before the merge: its base weights, the optimizer's tensors, and logits on a fixed batch."""

    def __init__(self, batch):
        self.batch = batch

    def on_train_end(self, trainer, pl_module):
        optimizer = trainer.optimizers[0]
        self.trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.adapters = {id(p) for n, p in pl_module.named_parameters() if ".lora_" in n}
        self.state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.dim() > 0)
        self.base = {n.replace(".base_layer", ""): p.detach().clone()
                     for n, p in unwrap_peft(pl_module.model).named_parameters() if ".lora_" not in n}
        self.lora_b = [p.detach().clone() for n, p in pl_module.named_parameters() if "lora_B" in n]
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(self.batch["input_ids"], self.batch["attention_mask"])
        pl_module.train()


def fit(model_dir, root, callback, *, max_steps=4, ckpt_path=None, extra=(), data=DATA):
    L.seed_everything(0)
    module = SFTModule(model=str(model_dir), num_generate=0, scheduler=None,
                       optimizer=functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1))
    inspect = Inspect(sft_batch(seed=5, vocab=100))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(root),
        callbacks=[callback, inspect, *extra],
        enable_checkpointing=any(isinstance(c, L.pytorch.callbacks.ModelCheckpoint) for c in extra),
    )
    trainer.fit(module, datamodule=NoShuffle(tokenizer=str(model_dir), **data), ckpt_path=ckpt_path, weights_only=False)
    return module, inspect


def test_fit_trains_only_the_adapters_and_exports_the_merged_model(tiny_llama_dir, tmp_path, caplog):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    callback = LoRAFinetuning(r=2)
    expected = lora_count(base, resolve_targets(base, None), r=2)
    with caplog.at_level(logging.INFO):
        module, inspect = fit(tiny_llama_dir, tmp_path, callback, extra=[ExportHF(str(tmp_path / "export"))])

    # AdamW with weight decay 0.1 saw only the adapters; every base weight is bit-identical.
    assert inspect.trained == inspect.adapters and inspect.state_numel == 2 * expected
    total = sum(p.numel() for p in base.parameters())
    assert callback.summary["trainable"] == expected and callback.summary["total"] == total
    for name, p in base.named_parameters():
        assert torch.equal(inspect.base[name], p), name
    assert all(b.abs().max() > 0 for b in inspect.lora_b)  # the adapters did train
    printed = f"trainable parameters {expected:,} ({100 * expected / total:.2f}% of the model's {total:,})"
    assert printed in caplog.text

    # After fit the module holds the plain merged model; the export reloads with transformers alone.
    assert type(module.model) is type(base) and not any(isinstance(m, LoraLayer) for m in module.modules())
    assert not (tmp_path / "export" / "adapter_config.json").exists()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(exported) is type(base)
    with torch.no_grad():
        logits = exported(input_ids=inspect.batch["input_ids"], attention_mask=inspect.batch["attention_mask"]).logits
    torch.testing.assert_close(logits, inspect.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, base(input_ids=inspect.batch["input_ids"]).logits, atol=1e-3)


@pytest.mark.slow
def test_resume_gives_the_same_adapters_and_the_checkpoint_merges(tiny_llama_dir, tmp_path):
    data = {**DATA, "train_size": 4}  # one batch per epoch: every step sees the same batch
    straight, _ = fit(tiny_llama_dir, tmp_path / "straight", LoRAFinetuning(r=2), max_steps=4, data=data,
                      extra=[ExportHF(str(tmp_path / "straight" / "export"))])
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tiny_llama_dir, tmp_path / "first", LoRAFinetuning(r=2), max_steps=2, extra=[ckpt], data=data)
    last = tmp_path / "ckpt" / "last.ckpt"
    resumed, inspect = fit(tiny_llama_dir, tmp_path / "resumed", LoRAFinetuning(r=2), max_steps=4, ckpt_path=str(last),
                           data=data)
    assert inspect.state_numel == 2 * lora_count(straight.model, resolve_targets(straight.model, None), r=2)
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # The checkpoint loads into a PEFT model rebuilt from the callback state, and merges to the same model
    # as the fit's own merge at step 2.
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    rebuilt = lora_from_checkpoint(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), checkpoint)
    rebuilt.load_state_dict({k[len("model."):]: v for k, v in checkpoint["state_dict"].items()}, strict=True)
    two_steps, _ = fit(tiny_llama_dir, tmp_path / "two", LoRAFinetuning(r=2), max_steps=2, data=data)
    merged = dict(rebuilt.merge_and_unload().named_parameters())
    for name, p in two_steps.model.named_parameters():
        torch.testing.assert_close(merged[name], p, rtol=0, atol=0)

    # validate of a LoRA checkpoint: the callback wraps the model before Lightning loads it.
    checked = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[LoRAFinetuning(r=2)], default_root_dir=str(tmp_path / "validate"))
    fresh = SFTModule(model=str(tiny_llama_dir), num_generate=0, scheduler=None)
    val = NoShuffle(tokenizer=str(tiny_llama_dir), **data)
    [metrics] = checked.validate(fresh, datamodule=val, ckpt_path=str(last), weights_only=False)
    assert metrics["val/loss"] == pytest.approx(two_steps.evaluate_loss(val.val_dataloader()), rel=1e-5)

    # Other LoRA options are refused, not silently trained with another scale (alpha: same shapes) or
    # loaded half (another rank: `lit_heads fit`'s CheckpointSafety compares the shapes).
    with pytest.raises(ConfigError, match="trained with LoRA r=2, alpha=4.0"):
        fit(tiny_llama_dir, tmp_path / "other", LoRAFinetuning(r=2, alpha=8), max_steps=4, ckpt_path=str(last),
            data=data)
    shape = r"another shape \(e.g. model.base_model.model.model.layers.0.self_attn.k_proj.lora_A"
    with pytest.raises(ModelError, match=shape):
        fit(tiny_llama_dir, tmp_path / "rank", LoRAFinetuning(r=3), max_steps=4, ckpt_path=str(last), data=data,
            extra=[CheckpointSafety()])


def test_lora_and_head_restriction_together_are_refused(tiny_llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="Keep one of them"):
        fit(tiny_llama_dir, tmp_path, LoRAFinetuning(r=2), extra=[HeadRestrictedFinetuning(strategy="random", top_k=1)])


TINY = monitored_overrides(
    {"class_path": "lit_heads.callbacks.lora.LoRAFinetuning", "init_args": {"r": 4, "targets": ["q_proj", "o_proj"]}})


@pytest.mark.slow
def test_cli_lora_fit_monitors_heads_through_the_wrapper(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_overlay(TINY)
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml",
          "--model.model", str(tiny_llama_dir)])
    history = PatternHistory.load(tmp_path / "runs/quickstart/heads/ap_history.safetensors")
    assert history.steps == [0, 2, 4]
    dm = SFTDataModule(tokenizer=str(tiny_llama_dir), train_size=16, val_size=8, max_length=128, batch_size=3)
    dm.setup("fit")
    batches = list(dm.make_dataloader(dm.val_examples[:6]))
    # Step 0: the wrapped model with B = 0 is the base model; the last step: the merged export.
    base = compute_ap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), batches, progress=False).scores
    export = AutoModelForCausalLM.from_pretrained(tmp_path / "runs/quickstart/export")
    final = compute_ap(export, batches, progress=False).scores
    torch.testing.assert_close(history.scores[0], base, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(history.scores[-1], final, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(history.scores[0], history.scores[-1], rtol=1e-3)
    metrics = [json.loads(line) for line in (tmp_path / "runs/quickstart/metrics.jsonl").read_text().splitlines()]
    free = [m for m in metrics if "heads_free/gini" in m]
    assert [m["step"] for m in free] == [2, 4] and all(0 < m["heads_free/gini"] < 1 for m in free)


def test_cli_unknown_target_exits_2(tmp_path, tiny_llama_dir, tiny_overlay, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overlay = copy.deepcopy(TINY)
    overlay["trainer"]["callbacks"][0]["init_args"]["targets"] = ["q_proj", "attn_out"]
    tiny_overlay(overlay)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", "tiny.yaml",
              "--model.model", str(tiny_llama_dir)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'attn_out' is not a linear layer" in err and "q_proj, k_proj, v_proj, o_proj" in err
