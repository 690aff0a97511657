"""Side-by-side benchmarks of lit_heads, measured in one run of this script on the same machine.

Each section compares two ways of doing the same work (same model, batches, optimizer, precision),
alternating A B A B so that drift of a shared machine hits both alike, and reports the median of the
per-round ratios. Results print as a markdown table and are written to `--output` (JSON), with the
machine line and the load average at start and end (honest context for noisy numbers).

    python scripts/benchmark.py                                   # every section, default sizes
    python scripts/benchmark.py --sections throughput monitor --steps 8 --rounds 3
    python scripts/benchmark.py --sections lm_loss --model gemma3-270m    # batch 8 x 512 tokens

Sections (each function's docstring says exactly what it measures):
  throughput  training tokens/s: lit_heads (SFTModule + Lightning Trainer) vs a plain PyTorch loop. Target >= 0.95x.
  ap          `lit_heads ap`'s computation (compute_ap, sdpa, dynamic padding) vs the paper's reference
              procedure (eager, retained Γ gradients, padded to 1,024, one sample at a time) on GSM8K:
              speed ratio (target >= 5x), max relative difference (target <= 1e-4), peak RSS of each.
  monitor     step time with HeadActivationMonitor(free=True) vs without. Target <= 5% more.
  restricted  top-10% heads (HeadRestriction, kv="group") vs full SFT: optimizer-state bytes (target
              ratio <= 0.05), step time (target ratio <= 0.7), peak RSS.
  lm_loss     the chunked response-token loss vs the plain full-logits one (any --model, e.g. gemma3-270m;
              --lm_batch 8 --lm_length 512 by default): peak RSS of a training step and of an AP batch
              (targets <= 0.5x), seconds per step (target <= 1.05x).
  load_memory peak RSS of a fresh process loading --model, per --load_dtypes dtype: target <= 1.2 x
              parameters x bytes per parameter above the process baseline.

Sections that need memory figures run each side in a fresh child process of this script
(`--_worker NAME`) and read the child's own peak resident set size (VmHWM, the high-water mark of
its own address space, torch allocations included), alternating the children A B A B.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
DATA = REPO.parent / "shared" / "data"
SECTIONS: dict = {}
WORKERS: dict = {}


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


def worker(fn):
    WORKERS[fn.__name__.removeprefix("w_")] = fn
    return fn


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {cpu}, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    from lit_heads.commands.compare import peak_rss_mb as own_peak  # VmHWM: not inherited from this parent

    return own_peak()


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def fixed_batches(model_name: str, n: int, batch_size: int, max_length: int) -> list[dict]:
    from lit_heads.data import SFTDataModule

    dm = SFTDataModule(tokenizer=model_name, batch_size=batch_size, max_length=max_length, train_size=n * batch_size)
    dm.setup("fit")
    return [b for _, b in zip(range(n), dm.train_dataloader())]


def _tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def _as_loader(batches):
    # batch_size=None: the loader yields the ready-made batch dicts unchanged. Lightning needs a
    # loader (a bare list of dicts is taken as a list of loaders); the plain loop uses the same one.
    from torch.utils.data import DataLoader

    return DataLoader(batches, batch_size=None, shuffle=False)


def _run_worker(name: str, payload: dict, timeout: float = 1800) -> dict:
    """Run `name` in a fresh child process of this script; returns the dict the child wrote."""
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(payload))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", name, "--_in", str(inp), "--_out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


# ==================================================================================================
# throughput


@section
def throughput(args) -> dict:
    """Training tokens/s (non-padding tokens of the timed batches / wall time of the timed steps).

    A: a plain PyTorch + transformers loop (forward, lit_heads' response loss, backward, AdamW step,
    zero_grad). B: SFTModule fitted by a Lightning Trainer (what `lit_heads fit` runs; progress bar,
    logger, checkpointing and validation off, the module's own per-step logging on). Same model
    object, same batches (fixed, from the default generated tasks), AdamW(lr=1e-5, wd=0.01), no LR
    schedule, fp32. Each round: `warmup` untimed steps (AdamW state allocation), then `steps` timed
    ones, from the start of the first timed batch to the end of the last optimizer step.
    """

    from lit_heads.heads.lm_loss import mean_loss, token_losses
    from lit_heads.module import SFTModule

    device = torch.device(args.device)
    batches = fixed_batches(args.model, args.warmup + args.steps, args.batch_size, args.max_length)
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    loader = _as_loader(batches)
    timed_tokens = _tokens(batches[args.warmup:])

    def plain_loop(model) -> float:
        model.to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        start = 0.0
        for i, batch in enumerate(loader):
            if i == args.warmup:
                _sync()
                start = time.perf_counter()
            # The loss SFTModule computes (the chunked path by default): the comparison is of the loops.
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            mean_loss(token_losses(model, inputs, batch["labels"])).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync()
        return timed_tokens / (time.perf_counter() - start)

    clock = _Clock(args.warmup)

    def lit_heads_fit(module) -> float:
        trainer = _trainer(len(batches), [clock], accelerator="gpu" if device.type == "cuda" else "cpu")
        module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
        module.scheduler_factory = None
        trainer.fit(module, train_dataloaders=loader)
        return timed_tokens / clock.elapsed

    module = SFTModule(args.model, num_generate=0)
    plain, lit = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(module.model))
        lit.append(lit_heads_fit(module))
        print(f"  round {r}: plain {plain[-1]:.1f} tok/s, lit_heads {lit[-1]:.1f} tok/s", flush=True)
    ratios = [b / a for a, b in zip(plain, lit)]
    ratio = statistics.median(ratios)
    return {
        "what": f"training tokens/s, batch {args.batch_size} x <= {args.max_length} tokens ({timed_tokens} real tokens "
                f"timed per round), AdamW, fp32 on {device.type}, {args.steps} timed + {args.warmup} warmup steps x "
                f"{args.rounds} rounds",
        "rows": [["throughput", "tokens/s (plain PyTorch | lit_heads fit)", statistics.median(plain),
                  statistics.median(lit),
                  ratio, ">= 0.95", ratio >= 0.95]],
        "plain_tokens_per_s": plain,
        "lit_heads_tokens_per_s": lit,
        "ratios": ratios,
        "ratio_median": ratio,
        "target": ">= 0.95",
        "met": ratio >= 0.95,
    }


class _Clock:
    """Lightning callback: wall time from the start of batch `warmup` to the end of the last batch
    (after its optimizer step and every other callback, when it is the last callback)."""

    def __new__(cls, warmup):
        import lightning as L

        class Clock(L.Callback):
            def __init__(self):
                self.warmup, self.start, self.end, self.tokens = warmup, 0.0, 0.0, 0

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == self.warmup:
                    _sync()
                    self.start, self.tokens = time.perf_counter(), 0
                if batch_idx >= self.warmup:
                    self.tokens += int(batch["attention_mask"].sum())

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                _sync()
                self.end = time.perf_counter()

            @property
            def elapsed(self):
                return self.end - self.start

        return Clock()


def _sync() -> None:
    # CUDA runs asynchronously: a clock read without a sync would stop before the GPU has finished.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _trainer(max_steps: int, callbacks: list, accelerator: str = "cpu"):
    import lightning as L

    return L.Trainer(
        max_steps=max_steps, max_epochs=1, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=callbacks,
    )


# ==================================================================================================
# ap


def _gsm8k_samples(model: str, n: int, max_length: int) -> tuple[list[dict], int] | None:
    path = DATA / "gsm8k" / "test.jsonl"
    if not path.is_file():
        return None
    from lit_heads.data import SFTDataModule, load_source

    dm = SFTDataModule(tokenizer=model, batch_size=1, max_length=max_length)
    examples = load_source(str(path), size=n, seed=42)[:n]
    encoded, truncated = dm.encoder.encode_all(examples, "gsm8k")
    if truncated:
        raise RuntimeError(f"{truncated} GSM8K samples are longer than {max_length} tokens")
    from lit_heads.data.collate import pad_token_id

    return encoded, pad_token_id(dm.tokenizer)


@section
def ap(args) -> dict:
    """`lit_heads ap`'s computation vs the paper's reference procedure, on the first GSM8K test questions.

    Samples: GSM8K test questions with their reference answers, rendered with the model's chat
    template exactly as `lit_heads ap` encodes them (prompt labels -100). The work is split into
    `ap_rounds` disjoint chunks of `ap_chunk` samples; each round scores its chunk once with each
    side, each side in a fresh child process, reference first (A B A B...).

    A (reference, scripts/reference_ap.py): eager attention with the post-softmax Γ retained with
    its gradient, every sample right-padded to 1,024 tokens, ONE SAMPLE PER FORWARD/BACKWARD (batch
    1), Hugging Face loss, full `loss.backward()`, per head Σ Γ·∂L/∂Γ. B (lit_heads): `compute_ap` on
    the default sdpa model, batches of `ap_batch` samples padded to their longest sample.
    Time: wall time of the scoring call only (model load excluded on both sides). Speed ratio =
    median over rounds of ref seconds / lit_heads seconds on the same chunk.
    Agreement: AP over all scored samples (equal chunks: mean of the chunk APs), both float32
    models, max over the 270 heads of |fast - ref| / ref.
    Memory: each child's own peak RSS (VmHWM), and the peak minus the RSS after model load.
    """
    got = _gsm8k_samples(args.model, args.ap_rounds * args.ap_chunk, 1024)
    if got is None:
        print(f"  skipped: {DATA / 'gsm8k' / 'test.jsonl'} not found", flush=True)
        return {"skipped": f"{DATA / 'gsm8k' / 'test.jsonl'} not found"}
    samples, pad_id = got
    lengths = [len(s["input_ids"]) for s in samples]
    ref, fast = [], []
    for r in range(args.ap_rounds):
        chunk = samples[r * args.ap_chunk:(r + 1) * args.ap_chunk]
        payload = {"model": args.model, "samples": chunk, "pad_id": pad_id, "batch_size": args.ap_batch}
        ref.append(_run_worker("ap_ref", payload))
        fast.append(_run_worker("ap_fast", payload))
        print(f"  round {r}: reference {ref[-1]['seconds']:.1f} s, lit_heads {fast[-1]['seconds']:.1f} s "
              f"({len(chunk)} samples)", flush=True)
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(ref, fast)]
    ref_ap = torch.tensor([x["ap"] for x in ref], dtype=torch.float64).mean(0)
    fast_ap = torch.tensor([x["ap"] for x in fast], dtype=torch.float64).mean(0)
    rel = lambda x: float(((x - ref_ap).abs() / ref_ap.abs()).max())  # noqa: E731
    speed, err = statistics.median(ratios), rel(fast_ap)
    peak_ref = max(x["peak_rss_mb"] for x in ref)
    peak_fast = max(x["peak_rss_mb"] for x in fast)
    inc_ref = max(x["peak_rss_mb"] - x["rss_after_load_mb"] for x in ref)
    inc_fast = max(x["peak_rss_mb"] - x["rss_after_load_mb"] for x in fast)
    n = len(samples)
    s_ref, s_fast = sum(x["seconds"] for x in ref), sum(x["seconds"] for x in fast)
    return {
        "what": (f"{n} GSM8K test samples ({min(lengths)}-{max(lengths)} tokens, mean {statistics.mean(lengths):.0f}) "
                 f"in {args.ap_rounds} rounds x {args.ap_chunk}; reference: eager, padded to 1024, batch 1; lit_heads: "
                 f"compute_ap, sdpa, batch {args.ap_batch}, dynamic padding; float32"),
        "rows": [
            ["ap", "seconds per sample (reference | lit_heads)", s_ref / n, s_fast / n, speed, ">= 5 (speed-up)",
             speed >= 5],
            ["ap", "max relative difference of the two patterns", None, None, err, "<= 1e-4", err <= 1e-4],
            # lit_heads | reference, like every other row's B | A (the speed row excepted: a speed-up).
            ["ap", "peak RSS MiB (reference | lit_heads)", peak_ref, peak_fast, peak_fast / peak_ref, "reported", None],
            ["ap", "peak RSS above loaded model MiB", inc_ref, inc_fast, inc_fast / max(inc_ref, 1e-9), "reported",
             None],
        ],
        "n_samples": n,
        "token_lengths": lengths,
        "reference_seconds": [x["seconds"] for x in ref],
        "lit_heads_seconds": [x["seconds"] for x in fast],
        "speed_ratios": ratios,
        "speed_ratio_median": speed,
        "max_rel_diff": err,
        "max_rel_diff_per_round": [
            float(((torch.tensor(b["ap"]) - torch.tensor(a["ap"])).abs() / torch.tensor(a["ap"]).abs()).max())
            for a, b in zip(ref, fast)],
        "reference_peak_rss_mb": [x["peak_rss_mb"] for x in ref],
        "lit_heads_peak_rss_mb": [x["peak_rss_mb"] for x in fast],
        "reference_rss_after_load_mb": [x["rss_after_load_mb"] for x in ref],
        "lit_heads_rss_after_load_mb": [x["rss_after_load_mb"] for x in fast],
        "ap_reference": ref_ap.tolist(),
        "ap_lit_heads": fast_ap.tolist(),
    }


@worker
def w_ap_ref(p: dict) -> dict:
    sys.path.insert(0, str(SCRIPTS))
    from reference_ap import load_reference_model, reference_ap

    model = load_reference_model(p["model"])
    rss = current_rss_mb()
    start = time.perf_counter()
    ap_ = reference_ap(model, p["samples"], p["pad_id"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "ap": ap_.tolist(), "rss_after_load_mb": rss, "peak_rss_mb": peak_rss_mb()}


@worker
def w_ap_fast(p: dict) -> dict:
    import lit_heads.heads.scoring as scoring
    from lit_heads.data.collate import SFTCollator
    from lit_heads.models import load_model

    model = load_model(p["model"])
    collate = SFTCollator(p["pad_id"])
    samples, bs = p["samples"], p["batch_size"]
    batches = [collate(samples[i:i + bs]) for i in range(0, len(samples), bs)]
    rss = current_rss_mb()
    start = time.perf_counter()
    pattern = scoring.compute_ap(model, batches, progress=False)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()

    return {"seconds": seconds, "ap": pattern.scores.tolist(), "rss_after_load_mb": rss, "peak_rss_mb": peak}


# ==================================================================================================
# monitor


@section
def monitor(args) -> dict:
    """Training step time with HeadActivationMonitor(free=True) vs without, same Trainer setup.

    Both sides: SFTModule + Lightning Trainer on the same SFTDataModule (default generated tasks,
    batch `batch_size` x <= `max_length`, fixed shuffle seed so both see the same batches), AdamW
    (lr=1e-5, wd=0.01), fp32. With the monitor: free=True (per-head gate scores captured from the
    training backward every step), every_n_steps=10**6 and a 2-sample probe, so the probe patterns
    (at fit start and fit end) fall outside the timed window. Timed: from the start of batch
    `warmup` to the end of the last batch (callbacks included; the clock is the last callback).
    Reported: seconds per step; overhead = median over rounds of monitored / plain - 1.
    """
    from lit_heads.callbacks.head_monitor import HeadActivationMonitor
    from lit_heads.data import SFTDataModule
    from lit_heads.module import SFTModule

    n = args.warmup + args.steps
    dm = SFTDataModule(tokenizer=args.model, batch_size=args.batch_size, max_length=args.max_length,
                       train_size=n * args.batch_size, val_size=2)
    module = SFTModule(args.model, num_generate=0)
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    module.scheduler_factory = None
    plain, mon = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for monitored, out in ((False, plain), (True, mon)):
                clock = _Clock(args.warmup)
                callbacks = [HeadActivationMonitor(every_n_steps=10**6, probe="train", probe_size=2, free=True,
                                                   log_table=False, dirpath=f"{tmp}/r{r}")] if monitored else []
                module.model.train()  # as the throughput loop does; load_model returns an eval-mode model
                _trainer(n, callbacks + [clock]).fit(module, datamodule=dm)
                out.append(clock.elapsed / args.steps)
            print(f"  round {r}: plain {plain[-1]:.2f} s/step, monitored {mon[-1]:.2f} s/step", flush=True)
    ratios = [b / a for a, b in zip(plain, mon)]
    overhead = statistics.median(ratios) - 1
    return {
        "what": f"s/step, batch {args.batch_size} x <= {args.max_length}, {args.steps} timed + {args.warmup} warmup "
                f"steps x {args.rounds} rounds",
        "rows": [["monitor", "s/step (no monitor | free=True monitor)", statistics.median(plain),
                  statistics.median(mon),
                  1 + overhead, "<= 1.05", overhead <= 0.05]],
        "plain_s_per_step": plain,
        "monitored_s_per_step": mon,
        "ratios": ratios,
        "overhead": overhead,
        "target": "<= 5% more",
        "met": overhead <= 0.05,
    }


# ==================================================================================================
# restricted


@section
def restricted(args) -> dict:
    """Top-10% heads (HeadRestriction, kv="group") vs full SFT, each in a fresh child process.

    Heads: `compute_ap` on one extra batch of the default generated tasks (not trained on; the
    selection is untimed, in this process), then `select_heads("top", fraction=0.1)` = 27 of 270.
    Both children: the same fixed batches, a plain PyTorch loop (forward, response
    loss, backward, AdamW(lr=1e-5, wd=0.01) step, zero_grad), fp32; full SFT trains every parameter,
    the restricted child `restriction.trainable_parameters()` only. Reported: optimizer-state bytes
    (sum of nbytes of every tensor in optimizer.state after the last step), median step time over
    the timed steps, each child's own peak RSS (VmHWM). Children alternate full, restricted, ...
    """
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.heads.selection import select_heads
    from lit_heads.models import load_model

    n = args.warmup + args.steps
    batches = fixed_batches(args.model, n + 1, args.batch_size, args.max_length)
    model = load_model(args.model)
    start = time.perf_counter()
    pattern = compute_ap(model, batches[-1:], progress=False)  # a batch not trained on
    select_s = time.perf_counter() - start
    L_, H = pattern.shape
    heads = select_heads("top", L_, H, fraction=0.1, scores=pattern.scores)
    del model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batches.pt"
        torch.save(batches[:n], path)
        full, part = [], []
        for r in range(args.rounds):
            payload = {"model": args.model, "batches": str(path), "warmup": args.warmup}
            full.append(_run_worker("train_steps", payload))
            part.append(_run_worker("train_steps", dict(payload, heads=heads)))
            print(f"  round {r}: full {full[-1]['step_s']:.2f} s/step, restricted {part[-1]['step_s']:.2f} s/step",
                  flush=True)
    state_ratio = part[0]["optimizer_state_bytes"] / full[0]["optimizer_state_bytes"]
    ratios = [b["step_s"] / a["step_s"] for a, b in zip(full, part)]
    step_ratio = statistics.median(ratios)
    peak_full, peak_part = max(x["peak_rss_mb"] for x in full), max(x["peak_rss_mb"] for x in part)
    return {
        "what": (f"{len(heads)} heads (top 10% by AP on {pattern.meta['n_samples']} samples, {select_s:.1f} s), "
                 f"kv=group, {part[0]['trainable']:,} of {full[0]['trainable']:,} parameters trained; batch "
                 f"{args.batch_size} x <= {args.max_length}, {args.steps} timed + {args.warmup} warmup steps x "
                 f"{args.rounds} rounds, plain loop, fp32"),
        "rows": [
            ["restricted", "optimizer state MiB (full | top-10% heads)", full[0]["optimizer_state_bytes"] / 2**20,
             part[0]["optimizer_state_bytes"] / 2**20, state_ratio, "<= 0.05", state_ratio <= 0.05],
            ["restricted", "s/step (full | top-10% heads)", statistics.median(x["step_s"] for x in full),
             statistics.median(x["step_s"] for x in part), step_ratio, "<= 0.7", step_ratio <= 0.7],
            ["restricted", "peak RSS MiB (full | top-10% heads)", peak_full, peak_part, peak_part / peak_full,
             "reported", None],
        ],
        "heads": heads,
        "trainable": {"full": full[0]["trainable"], "restricted": part[0]["trainable"]},
        "optimizer_state_bytes": {"full": full[0]["optimizer_state_bytes"],
                                  "restricted": part[0]["optimizer_state_bytes"]},
        "step_s": {"full": [x["step_s"] for x in full], "restricted": [x["step_s"] for x in part]},
        "step_times_s": {"full": [x["step_times"] for x in full], "restricted": [x["step_times"] for x in part]},
        "step_ratios": ratios,
        "peak_rss_mb": {"full": [x["peak_rss_mb"] for x in full], "restricted": [x["peak_rss_mb"] for x in part]},
    }


@worker
def w_train_steps(p: dict) -> dict:
    from lit_heads.heads.restrict import HeadRestriction
    from lit_heads.models import load_model
    from lit_heads.module import response_loss

    model = load_model(p["model"])
    model.train()
    if p.get("heads"):
        restriction = HeadRestriction(model, [tuple(h) for h in p["heads"]], kv="group").apply()
        params = restriction.trainable_parameters()
    else:
        params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    batches = torch.load(p["batches"])
    rss = current_rss_mb()
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        response_loss(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= p["warmup"]:
            times.append(time.perf_counter() - start)
    state = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {"step_s": statistics.median(times), "step_times": times, "optimizer_state_bytes": state,
            "trainable": sum(q.numel() for q in params), "rss_after_load_mb": rss, "peak_rss_mb": peak_rss_mb()}


# ==================================================================================================
# lm_loss


@section
def lm_loss(args) -> dict:
    """The chunked response-token loss (lit_heads.heads.lm_loss, `loss_chunk_size`) vs the plain path
    through the model's full [batch, seq, vocab] logits (`loss_chunk_size: 0`), each measurement in a
    fresh child process, alternating plain, chunked, plain, chunked, ...

    Batches: `lm_batch` x `lm_length` token ids, seeded random (the loss's cost does not depend on
    which tokens), every position real (no padding), the first (1 - `lm_labelled`) of each row
    labelled -100 as a prompt, the rest labelled as a response. The model loads in float32.
    Training step: a plain PyTorch loop (train mode, loss = mean over the response tokens, backward,
    AdamW(lr=1e-5, wd=0.01) step, zero_grad), `warmup` untimed steps then `steps` timed ones on the
    same batch; seconds per step = median of the timed steps. AP batch: `compute_ap` on one batch.
    Memory: each child's own peak RSS (VmHWM), and the peak minus the RSS after loading the model.
    Ratios: chunked / plain, median over the rounds (targets: peak RSS <= 0.5 for the training step
    and for the AP batch, seconds per step <= 1.05).
    Floor: a third child per round runs the same training step with the decoder only and no LM head
    (loss = mean of the final hidden states): weights, AdamW state, the decoder's activations and the
    input embedding's gradient, which every loss pays. Each loss's own memory is its peak above that
    floor, reported side by side (no target: it says where the rest of the step's memory goes).
    `--lm_checkpointing` runs every child with the decoder layers' activations checkpointed
    (non-reentrant, as `model.gradient_checkpointing: true` does), which lowers the floor for both sides;
    `--lm_kinds` picks the measurements (train, ap).
    """
    from lit_heads.heads.lm_loss import DEFAULT_CHUNK_SIZE

    chunk = args.lm_chunk or DEFAULT_CHUNK_SIZE
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (args.lm_batch, args.lm_length), generator=g)
    labels = ids.clone()
    labels[:, : round(args.lm_length * (1 - args.lm_labelled))] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rows = {kind: ([], []) for kind in args.lm_kinds}
    floor = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.pt"
        torch.save(batch, path)
        for r in range(args.rounds):
            for kind in rows:
                for side, size in ((0, 0), (1, chunk)):
                    payload = {"model": args.model, "batch": str(path), "chunk_size": size, "kind": kind,
                               "warmup": args.warmup, "steps": args.steps, "checkpointing": args.lm_checkpointing}
                    rows[kind][side].append(_run_worker("lm_loss_step", payload))
                plain, chunked = rows[kind][0][-1], rows[kind][1][-1]
                print(f"  round {r} {kind}: plain {plain['peak_rss_mb']:,.0f} MiB {plain['seconds']:.2f} s, chunked "
                      f"{chunked['peak_rss_mb']:,.0f} MiB {chunked['seconds']:.2f} s", flush=True)
            if "train" in rows:
                floor.append(_run_worker("lm_loss_step", {**payload, "kind": "train", "chunk_size": None}))
                print(f"  round {r} floor (decoder only): {floor[-1]['peak_rss_mb']:,.0f} MiB", flush=True)

    def ratio(kind, key):
        return statistics.median(b[key] / a[key] for a, b in zip(*rows[kind]))

    def median(kind, side, key):
        return statistics.median(x[key] for x in rows[kind][side])

    table_rows = []
    if "train" in rows:
        train_mem, step = ratio("train", "peak_rss_mb"), ratio("train", "seconds")
        floor_mb = statistics.median(x["peak_rss_mb"] for x in floor)
        loss_own = [median("train", side, "peak_rss_mb") - floor_mb for side in (0, 1)]
        table_rows += [
            ["lm_loss", "peak RSS MiB, training step (plain | chunked)", median("train", 0, "peak_rss_mb"),
             median("train", 1, "peak_rss_mb"), train_mem, "<= 0.5", train_mem <= 0.5],
            ["lm_loss", "s/step, training (plain | chunked)", median("train", 0, "seconds"),
             median("train", 1, "seconds"), step, "<= 1.05", step <= 1.05],
            ["lm_loss", f"training step, peak RSS MiB above the decoder-only floor of {floor_mb:,.0f} "
             "(plain | chunked)", loss_own[0], loss_own[1], loss_own[1] / loss_own[0], None, None],
        ]
    if "ap" in rows:
        ap_mem = ratio("ap", "peak_rss_mb")
        table_rows.append(["lm_loss", "peak RSS MiB, AP batch (plain | chunked)", median("ap", 0, "peak_rss_mb"),
                           median("ap", 1, "peak_rss_mb"), ap_mem, "<= 0.5", ap_mem <= 0.5])
    above = {k: [[x["peak_rss_mb"] - x["rss_after_load_mb"] for x in side] for side in rows[k]] for k in rows}
    return {
        "what": (f"{args.model}, batch {args.lm_batch} x {args.lm_length} tokens, {args.lm_labelled:.0%} labelled, "
                 f"chunk {chunk} positions, float32, "
                 + ("decoder layers checkpointed, " if args.lm_checkpointing else "")
                 + f"{args.steps} timed + {args.warmup} warmup steps x {args.rounds} rounds, each side in a fresh "
                 "process"),
        "rows": table_rows,
        "floor": floor,
        "chunk_size": chunk,
        "peak_above_loaded_model_mb": above,
        "runs": rows,
    }


# ==================================================================================================
# load memory


@section
def load_memory(args) -> dict:
    """Peak resident memory of a fresh process that loads `--model` with `load_model(model, dtype)`, for
    each of `--load_dtypes`, against the target 1.2 x N x bytes per parameter (N: the model's
    parameters, tied ones once). Each child first imports torch, transformers and the model's class and
    reads its config (its baseline: the peak RSS, VmHWM, at that point), then loads the weights and reads
    every one (memory-mapped weights count once touched), and reports its peak RSS above the baseline.
    One untimed child per dtype first fills the caches (de-quantized GGUF, the per-dtype copy), so the
    rounds measure a load, not a one-off conversion. Children alternate the dtypes, `--rounds` rounds;
    the worst round is reported.
    """
    from lit_heads.models import DTYPES

    runs: dict[str, list[dict]] = {d: [] for d in args.load_dtypes}
    for dtype in args.load_dtypes:
        _run_worker("load", {"model": args.model, "dtype": dtype})
    for r in range(args.rounds):
        for dtype in args.load_dtypes:
            runs[dtype].append(_run_worker("load", {"model": args.model, "dtype": dtype}))
        print("  round " + str(r) + ": " + ", ".join(f"{d} +{runs[d][-1]['above_baseline_mb']:.0f} MiB" for d in runs),
              flush=True)
    rows = []
    for dtype, children in runs.items():
        n = children[0]["parameters"]
        target = 1.2 * n * DTYPES[dtype].itemsize / 2**20
        worst = max(c["above_baseline_mb"] for c in children)
        rows.append(["load_memory", f"{dtype}: peak RSS above baseline MiB (1.2 x N x bytes | measured)", target, worst,
                     worst / target, "<= 1", worst <= target])
    first = next(iter(runs.values()))[0]
    return {
        "what": (f"{args.model}, N = {first['parameters']:,} parameters, load_model in fresh processes, every weight "
                 f"read; baseline (imports, config) {first['baseline_mb']:.0f} MiB; {args.rounds} rounds"),
        "rows": rows,
        "children": runs,
    }


@worker
def w_lm_loss_step(p: dict) -> dict:
    from lit_heads.heads.lm_loss import decoder_of, mean_loss, token_losses
    from lit_heads.heads.scoring import compute_ap
    from lit_heads.models import load_model

    model = load_model(p["model"])
    if p.get("checkpointing"):  # as SFTModule's gradient_checkpointing: true (active in train mode only)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = torch.load(p["batch"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    rss = current_rss_mb()
    if p["kind"] == "ap":
        start = time.perf_counter()
        compute_ap(model, [batch], progress=False, loss_chunk_size=p["chunk_size"])
        return {"seconds": time.perf_counter() - start, "rss_after_load_mb": rss, "peak_rss_mb": peak_rss_mb()}
    if p["chunk_size"] is None:  # the floor: the decoder without any head
        decoder = decoder_of(model)

        def loss():
            return decoder(**inputs, use_cache=False)[0].float().mean()
    else:
        def loss():
            return mean_loss(token_losses(model, inputs, batch["labels"], chunk_size=p["chunk_size"]))
    model.train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, weight_decay=0.01)
    times = []
    for i in range(p["warmup"] + p["steps"]):
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= p["warmup"]:
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "step_times": times, "rss_after_load_mb": rss,
            "peak_rss_mb": peak_rss_mb()}


@worker
def w_load(p: dict) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from lit_heads.models import load_model, resolve

    source = resolve(p["model"])
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(source.path))]  # imports the model's class
    baseline = peak_rss_mb()
    model = load_model(p["model"], dtype=p["dtype"])
    loaded = peak_rss_mb()
    with torch.no_grad():
        checksum = sum(float(q.sum(dtype=torch.float32)) for q in model.parameters())  # every page of every weight read
    return {"parameters": sum(q.numel() for q in model.parameters()), "dtype": str(next(model.parameters()).dtype),
            "baseline_mb": baseline, "after_load_mb": loaded, "peak_mb": peak_rss_mb(),
            "above_baseline_mb": peak_rss_mb() - baseline, "checksum": checksum}


# ==================================================================================================


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def table(results: dict) -> str:
    lines = ["| section | metric | A | B | ratio B/A (ap speed: A/B) | target | met |", "|---|---|---|---|---|---|---|"]
    for name in SECTIONS:
        for row in results.get(name, {}).get("rows", []):
            lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch_size", type=int, default=4, help="training batch (throughput, monitor, restricted)")
    parser.add_argument("--max_length", type=int, default=128, help="training tokens per sample")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds; the median ratio is reported")
    parser.add_argument("--ap_rounds", type=int, default=2, help="ap: A B rounds, each on its own chunk of samples")
    parser.add_argument("--ap_chunk", type=int, default=4, help="ap: GSM8K samples per round")
    parser.add_argument("--ap_batch", type=int, default=8, help="ap: lit_heads batch size")
    parser.add_argument("--lm_batch", type=int, default=8, help="lm_loss: samples per batch")
    parser.add_argument("--lm_length", type=int, default=512, help="lm_loss: tokens per sample")
    parser.add_argument("--lm_labelled", type=float, default=0.5, help="lm_loss: share of each sample labelled")
    parser.add_argument("--lm_chunk", type=int, default=0, help="lm_loss: loss_chunk_size (0: the default)")
    parser.add_argument("--lm_checkpointing", action="store_true",
                        help="lm_loss: checkpoint the decoder layers' activations in every child (lowers the floor)")
    parser.add_argument("--lm_kinds", nargs="+", default=["train", "ap"], choices=["train", "ap"],
                        help="lm_loss: which measurements to run")
    parser.add_argument("--device", default="cpu", help="throughput: cpu, or cuda (scripts/gpu_check.sh)")
    parser.add_argument("--load_dtypes", nargs="+", default=["float32", "bfloat16"],
                        help="load_memory: the dtypes to load --model in")
    parser.add_argument("--output", default="out/benchmark.json")
    parser.add_argument("--_worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--_in", help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:
        result = WORKERS[args._worker](json.loads(Path(args._in).read_text()))
        Path(args._out).write_text(json.dumps(result))
        return

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv),
               "loadavg_start": loadavg()}
    print(f"machine: {results['machine']}\nload average at start (1, 5, 15 min): {results['loadavg_start']}",
          flush=True)
    for name in args.sections:
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args)
        except Exception as err:  # one broken section must not lose the others' numbers
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
        results[name]["loadavg_after"] = loadavg()
        print(f"  {results[name].get('what', '')}  [{results[name]['wall_s']} s, load "
              f"{results[name]['loadavg_after']}]", flush=True)
    results["loadavg_end"] = loadavg()
    results["table"] = table(results)
    print(f"\nload average at end: {results['loadavg_end']}\n\n{results['table']}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
