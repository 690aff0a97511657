"""Side-by-side benchmarks of lit_heads, measured in one process run on the same machine.

Each section compares two ways of doing the same work on the same model, batches, optimizer and
precision, alternating A B A B so that drift of a shared machine hits both alike, and reports the
median ratio. Results print as a markdown table and are written to `--output` (JSON).

    python scripts/benchmark.py                       # every section
    python scripts/benchmark.py --sections throughput --steps 8 --rounds 3

Sections:
  throughput  training tokens/s of lit_heads (SFTModule + Lightning Trainer, i.e. what `lit_heads fit`
              runs) against a plain PyTorch + transformers loop. Target >= 0.95x.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

SECTIONS: dict = {}


def section(fn):
    SECTIONS[fn.__name__] = fn
    return fn


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{torch.get_num_threads()} torch threads, {cpu}, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def fixed_batches(model_name: str, n: int, batch_size: int, max_length: int) -> list[dict]:
    from lit_heads.data import SFTDataModule

    dm = SFTDataModule(tokenizer=model_name, batch_size=batch_size, max_length=max_length, train_size=n * batch_size)
    dm.setup("fit")
    return [b for _, b in zip(range(n), dm.train_dataloader())]


def _tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


@section
def throughput(args) -> dict:
    import lightning as L

    from lit_heads.module import SFTModule, response_loss

    batches = fixed_batches(args.model, args.warmup + args.steps, args.batch_size, args.max_length)
    timed = batches[args.warmup :]

    def plain_loop(model) -> float:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01)
        start = 0.0
        for i, batch in enumerate(batches):
            if i == args.warmup:
                start = time.perf_counter()
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            response_loss(logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return _tokens(timed) / (time.perf_counter() - start)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == args.warmup:
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.end = time.perf_counter()

    def lit_heads_fit(module) -> float:
        clock = Clock()
        trainer = L.Trainer(
            max_steps=len(batches), accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
            callbacks=[clock],
        )
        optimizer = lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)  # noqa: E731
        module.optimizer_factory, module.scheduler_factory = optimizer, None
        trainer.fit(module, train_dataloaders=batches)
        return _tokens(timed) / (clock.end - clock.start)

    module = SFTModule(args.model, num_generate=0)
    plain, lit = [], []
    for _ in range(args.rounds):
        plain.append(plain_loop(module.model))
        lit.append(lit_heads_fit(module))
    ratios = [b / a for a, b in zip(plain, lit)]
    return {
        "what": f"training tokens/s, batch {args.batch_size} x <= {args.max_length} tokens, AdamW, fp32, {args.steps} timed steps x {args.rounds} rounds",
        "plain_tokens_per_s": statistics.median(plain),
        "lit_heads_tokens_per_s": statistics.median(lit),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "target": ">= 0.95",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="A B rounds; the median ratio is reported")
    parser.add_argument("--output", default="out/benchmark.json")
    args = parser.parse_args()

    results = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    for name in args.sections:
        print(f"== {name}", flush=True)
        results[name] = SECTIONS[name](args)
        for key, value in results[name].items():
            print(f"  {key:<26} {value:.4g}" if isinstance(value, float) else f"  {key:<26} {value}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
