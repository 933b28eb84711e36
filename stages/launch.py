"""The train stage's command line: plain python, or under torchrun / accelerate launch (params.yaml's launcher keys).

A module of its own, light to import: stages/train.py declares it in its DVC entry, and users and tests call it
through stages.dag as before.
"""

from __future__ import annotations

from typing import Any


def train_command(stage: str, train) -> str:
    """The train stage's command: `python -m stages.train <stage>`, or that module under torchrun / accelerate
    launch with the stage's launcher keys (tunepipe.config.TrainParams). Every process runs the same trainer
    (gloo on CPU, nccl on GPU); only rank 0 writes. Multi-machine runs: each machine sets its own rank
    (PET_NODE_RANK for torchrun, machine_rank in its accelerate config)."""
    import shlex

    from tunepipe.errors import ConfigError

    key = f"stages.{stage}"
    module = f"-m stages.train {stage}"
    if train.config_file is not None and train.launcher != "accelerate":
        raise ConfigError("config_file is an accelerate config: set launcher: accelerate", key=f"{key}.config_file")
    if train.launcher == "none":
        extra = [name for name in ("nproc_per_node", "nnodes", "master_addr", "master_port")
                 if getattr(train, name) not in (None, 1)]
        if extra:
            raise ConfigError(f"{', '.join(extra)} need a launcher: set launcher: torchrun or accelerate",
                              key=f"{key}.launcher")
        return f"python {module}"
    def flags(*pairs: tuple[str, Any]) -> list[str]:
        return [f"{flag} {value}" for flag, value in pairs if value is not None]

    def quoted(value: str | None) -> str | None:
        return shlex.quote(value) if value is not None else None

    if train.launcher == "torchrun":
        parts = ["torchrun", *flags(("--nnodes", train.nnodes), ("--nproc-per-node", train.nproc_per_node),
                                    ("--master-addr", quoted(train.master_addr)),
                                    ("--master-port", train.master_port))]
    else:  # accelerate counts processes over all machines
        processes = train.nproc_per_node * (train.nnodes or 1) if train.nproc_per_node is not None else None
        parts = ["accelerate launch", *flags(("--config_file", quoted(train.config_file)),
                                             ("--num_processes", processes), ("--num_machines", train.nnodes),
                                             ("--main_process_ip", quoted(train.master_addr)),
                                             ("--main_process_port", train.master_port))]
    return " ".join([*parts, module])
