"""`lit_heads plan`: will it fit? Trainable counts and per-device memory of SFT arms, before renting a GPU.

    lit_heads plan --model configs/models/llama-3-8b.json --arms full top:0.1 random:102 --kv none \\
        --strategy fsdp --devices 8
    lit_heads plan --model smollm2-135m --arms full top:27 --precision 32-true --memory 24GiB
    lit_heads plan --config plan.yaml --devices 4        # the same options from YAML; flags override

The model is built on the meta device from its config (no weights, no download); a .gguf file gives only
its metadata. Arms are written as for `lit_heads compare`. The estimate is `lit_heads.analysis.memory_plan`.
"""

from __future__ import annotations

from pathlib import Path

DESCRIPTION = (
    "Will it fit? For each arm (full, top:0.1, random:27, list:<file>, ...): the exact trainable parameter "
    "count that `lit_heads fit` prints, and per device the bytes of weights, gradients, optimizer state, "
    "activations and their peak against --memory, for a strategy, world size and precision. The model is "
    "built on the meta device: no weights, no download."
)


def plan(
    model: str,
    arms: list[str],
    kv: str = "group",
    scores: str | None = None,
    seed: int = 0,
    strategy: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    precision: str = "bf16-mixed",
    batch_size: int = 1,
    max_length: int = 2048,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    memory: str = "80GB",
) -> list:
    """Print the plan of every arm and return the `ArmPlan`s. Every option is checked before the model is built."""
    from lit_heads.analysis import memory_plan as mp
    from lit_heads.commands.compare import parse_arm
    from lit_heads.errors import ConfigError

    parsed = [parse_arm(a) for a in arms]
    if not parsed:
        raise ConfigError("lit_heads plan needs --arms, e.g. --arms full top:0.1 random:27.")
    mp.check_options(strategy, precision, optimizer, devices, num_nodes, batch_size, max_length, kv)
    capacity = mp.parse_memory(memory)
    if scores is not None and not Path(scores).is_file():
        raise ConfigError(f"--scores {scores} does not exist. Give a pattern written by `lit_heads ap` "
                          "(.safetensors) or an L x H .npy.")

    config, source = mp.load_config(model)
    net = mp.meta_model(config)
    facts = mp.model_facts(net)
    counts = mp.count_arms(net, facts, parsed, kv=kv, scores=scores, seed=seed)
    run = mp.RunShape(strategy, devices, num_nodes, precision, batch_size, max_length, gradient_checkpointing,
                      optimizer, kv)
    plans = [mp.plan_arm(facts, count, run, capacity) for count in counts]

    d = facts.dims
    states = mp.OPTIMIZERS[optimizer][0]
    lines = [
        f"lit_heads plan: {source}, {facts.arch} ({facts.class_name}) built on the meta device (no weights)",
        f"  model: {facts.total:,} parameters; {d.n_layers} layers x {d.n_heads} heads ({d.n_kv_heads} KV heads, "
        f"head_dim {d.head_dim}), hidden {d.hidden:,}, MLP {d.intermediate:,}, vocabulary {d.vocab:,}",
        f"  run: {run.strategy if run.strategy == strategy else f'{strategy} = {run.strategy}'} on "
        f"{_plural(devices, 'device')} x {_plural(num_nodes, 'node')} = world size {run.world}; precision {precision}; "
        f"micro-batch {batch_size} x {max_length:,} tokens per device; gradient checkpointing "
        f"{'on' if gradient_checkpointing else 'off'}; {optimizer} ({states} states); kv={kv}; "
        f"memory {mp.format_memory(capacity, memory)} per device",
    ]
    if run.strategy in ("fsdp", "deepspeed_stage_3"):
        lines.append(f"  {run.strategy}: assumes one unit per {facts.layer_class} (for fsdp: "
                     f"--trainer.strategy.auto_wrap_policy with {facts.layer_class}; Lightning's default wraps nothing "
                     "and gathers every weight at once)")
    print("\n".join(lines) + "\n")
    for arm_plan in plans:
        print(mp.format_arm(arm_plan, facts, memory) + "\n")
    print(mp.MEMORY_MODEL)
    return plans


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def main(argv: list[str]) -> list:
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit_heads plan", description=DESCRIPTION)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below.")
    parser.add_argument("--model", type=str, required=True,
                        help="bundled short name, HF directory, .gguf file, config.json file "
                             "(configs/models/*.json) or .ckpt")
    parser.add_argument("--arms", type=str, nargs="+", default=["full", "top:0.1"],
                        help="full, <top|bottom|random>:<fraction|N%%|count>, list:<head-list file>")
    parser.add_argument("--kv", type=str, default="group", help="GQA key/value policy of head arms: group or none")
    parser.add_argument("--scores", type=str, default=None,
                        help="pattern file that ranks heads for top/bottom arms (exact counts under kv=group)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random arms (as HeadRestrictedFinetuning's seed)")
    parser.add_argument("--strategy", type=str, default="auto",
                        help="auto (single_device on one device, else ddp), single_device, ddp, fsdp, "
                             "deepspeed_stage_1, deepspeed_stage_2 or deepspeed_stage_3")
    parser.add_argument("--devices", type=int, default=1, help="devices per node")
    parser.add_argument("--num_nodes", type=int, default=1, help="nodes")
    parser.add_argument("--precision", type=str, default="bf16-mixed",
                        help="32-true, bf16-true, 16-true, bf16-mixed or 16-mixed")
    parser.add_argument("--batch_size", type=int, default=1, help="micro-batch per device")
    parser.add_argument("--max_length", type=int, default=2048, help="tokens per sample")
    parser.add_argument("--gradient_checkpointing", type=bool, default=False, help="checkpoint every decoder layer")
    parser.add_argument("--optimizer", type=str, default="adamw", help="adamw, adam, sgd_momentum or sgd")
    parser.add_argument("--memory", type=str, default="80GB", help="memory per device, e.g. 80GB, 141GB, 24GiB")
    args = parser.parse_args(argv)
    options = args.as_dict()
    options.pop("config", None)
    return plan(**options)
