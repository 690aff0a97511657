"""Multi-node runs: refuse `trainer.num_nodes > 1` started without a launcher, which would wait forever.

Lightning starts one process per device on its own node, but the nodes themselves must be started by
a launcher that tells each process where the master is and which node it is on: torchrun
(TorchElastic), SLURM's srun, LSF's jsrun, MPI, or by hand with MASTER_ADDR, MASTER_PORT and
NODE_RANK (Lightning's LightningEnvironment). Started without one, every process believes it is node 0
and waits for the others to join the process group until a 30-minute timeout.
"""

from __future__ import annotations

import os

from lit_heads.errors import ConfigError

_BY_HAND = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK")


def check_launch_environment(trainer_config) -> None:
    """A ConfigError when `trainer.num_nodes` > 1 and no launcher's environment is found. A cluster
    environment given in `trainer.plugins` is trusted."""
    num_nodes = trainer_config.get("num_nodes") or 1
    if int(num_nodes) < 2 or trainer_config.get("plugins"):
        return
    from lightning.fabric.plugins.environments import (
        LSFEnvironment,
        MPIEnvironment,
        SLURMEnvironment,
        TorchElasticEnvironment,
    )

    if any(env.detect() for env in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)):
        return
    missing = [k for k in _BY_HAND if not os.environ.get(k)]
    if not missing:
        return
    raise ConfigError(
        f"trainer.num_nodes is {num_nodes}, but this process was not started by a multi-node launcher: no "
        f"torchrun, SLURM (srun), LSF or MPI environment, and {', '.join(missing)} not set. Every node would "
        f"wait for the others forever. Start one process per node with `torchrun --nnodes {num_nodes} "
        "--nproc-per-node <devices> --node-rank <n> --master-addr <host> --master-port <port> -m lit_heads.cli "
        "fit ...`, or `srun` inside an sbatch job with --nodes and --ntasks-per-node = devices, or set "
        "MASTER_ADDR, MASTER_PORT and NODE_RANK on each node yourself (see README, Multi-node). On one machine, "
        "use num_nodes: 1 and devices: N."
    )
