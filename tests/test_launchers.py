"""Launchers in params.yaml: the train stage's command in dvc.yaml, its checks, and real 2-process runs on CPU.

The command tests are instant. The slow one runs train-sft as 2 processes (gloo) through the pipeline flow that
`tunepipe run` runs, then under `accelerate launch` with LLaMA-Factory's FSDP2 config (CPU-adapted), and compares
both adapters with a 1-process run at the same global batch.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import dag
from tests.conftest import ROOT, SHARED, make_project
from tunepipe.config import TrainParams, parse_params
from tunepipe.errors import ConfigError

LF_EXAMPLES = SHARED / "data" / "llamafactory-examples"


def command(**train) -> str:
    return dag.train_command("sft", TrainParams(**train))


def test_no_launcher_is_one_python_process():
    assert command() == "python -m stages.train sft"


def test_torchrun_command_carries_the_launch_keys():
    assert command(launcher="torchrun", nproc_per_node=2) == "torchrun --nproc-per-node 2 -m stages.train sft"
    assert command(launcher="torchrun", nproc_per_node=8, nnodes=2, master_addr="10.0.0.1", master_port=29501) == (
        "torchrun --nnodes 2 --nproc-per-node 8 --master-addr 10.0.0.1 --master-port 29501 -m stages.train sft")


def test_accelerate_command_carries_its_config_file():
    assert command(launcher="accelerate") == "accelerate launch -m stages.train sft"
    assert command(launcher="accelerate", config_file="configs/fsdp 2.yaml", nproc_per_node=4, nnodes=2,
                   master_addr="head", master_port=29600) == (
        "accelerate launch --config_file 'configs/fsdp 2.yaml' --num_processes 8 --num_machines 2 "
        "--main_process_ip head --main_process_port 29600 -m stages.train sft")


@pytest.mark.parametrize("train, message", [
    ({"nproc_per_node": 2}, "nproc_per_node need a launcher"),
    ({"master_port": 29500}, "master_port need a launcher"),
    ({"launcher": "torchrun", "config_file": "fsdp.yaml"}, "config_file is an accelerate config"),
])
def test_launch_keys_without_their_launcher_are_refused(train, message):
    with pytest.raises(ConfigError, match=message) as err:
        command(**train)
    assert "stages.sft" in str(err.value)


def test_dvc_yaml_carries_the_command_and_the_config_files_as_deps():
    """Per stage (sft on 2 processes with DeepSpeed) or for all (accelerate for every stage); the config files are
    deps, so editing one reruns the stage; DeepSpeed's config reaches the trainer (TrainingArguments.deepspeed)."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    ds = "../shared/data/llamafactory-examples/deepspeed__ds_z2_config.json"
    data["stages"]["sft"].update(launcher="torchrun", nproc_per_node=2, deepspeed=ds)
    stages = dag.build(ROOT, parse_params(data))["stages"]
    assert stages["train-sft"]["cmd"] == "torchrun --nproc-per-node 2 -m stages.train sft"
    assert stages["train-cpt"]["cmd"] == "python -m stages.train cpt"
    assert ds in stages["train-sft"]["deps"]  # outside the project: as params.yaml writes it (the same in every clone)
    from tunepipe.plan import train_inputs

    assert train_inputs(parse_params(data), "sft").train.deepspeed == ds  # the plan section DVC compares

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["train"].update(launcher="accelerate", config_file="data/dataset_info.json")  # any file in the project
    stages = dag.build(ROOT, parse_params(data))["stages"]
    assert stages["train-dpo"]["cmd"] == "accelerate launch --config_file data/dataset_info.json -m stages.train dpo"
    assert "data/dataset_info.json" in stages["train-dpo"]["deps"]


def test_deepspeed_config_reaches_the_trainer_or_is_refused_before_any_work(tmp_path):
    """deepspeed does not install on this CPU-only machine: the stage says so in one line before loading anything;
    where it is installed the path goes into TrainingArguments (checked with the argument builder)."""
    import importlib.util

    from tests.test_training import make_inputs
    from tunepipe.train import recipe

    config = LF_EXAMPLES / "deepspeed__ds_z2_config.json"
    if not config.is_file():
        pytest.skip("no LLaMA-Factory example configs beside the project")
    inputs = make_inputs("sft", deepspeed=str(config))
    if importlib.util.find_spec("deepspeed") is None:
        with pytest.raises(ConfigError, match="needs the deepspeed package, which is not installed"):
            recipe.check_backends(inputs)
    missing = make_inputs("sft", deepspeed=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="nope.json not found"):
        recipe.check_backends(missing)


# ---------------------------------------------------------------------------------------------------------------
# 2 processes on CPU (gloo) through the pipeline flow
# ---------------------------------------------------------------------------------------------------------------
STEPS, GLOBAL_BATCH = 3, 4
SFT_ONLY = {"stages": {"cpt": {"enabled": False}, "dpo": {"enabled": False},
                       "sft": {"launcher": "torchrun", "nproc_per_node": 2, "max_steps": STEPS, "packing": True,
                               "per_device_train_batch_size": GLOBAL_BATCH // 2}}}
# accelerate's MULTI_GPU type with use_cpu starts one process per num_processes through torch.distributed (gloo);
# its MULTI_CPU type starts a single process unless launched through MPI.
FSDP_CPU = {"mixed_precision": "no", "use_cpu": True}


def adapter(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_processes_train_the_single_process_adapter(tmp_path_factory, prefect_harness, monkeypatch):
    import torch

    from flows.pipeline import pipeline
    from tunepipe.plan import read_section
    from tunepipe.train import recipe

    project = make_project(tmp_path_factory, SFT_ONLY, label="launchers")
    monkeypatch.syspath_prepend(str(project))
    state = pipeline(project_dir=str(project), return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_completed(), result
    assert {s["name"]: s["status"] for s in result["stages"]}["train-sft"] == "ran"
    generated = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert generated["train-sft"]["cmd"] == "torchrun --nproc-per-node 2 -m stages.train sft"

    # one set of outputs: one adapter, one metrics file, one MLflow run for the stage, no leftovers
    metrics = json.loads((project / "metrics" / "train_sft.json").read_text())
    assert metrics["steps"] == STEPS
    # (DVC writes a .gitignore there unless git already ignores outputs/)
    assert sorted({p.name for p in (project / "outputs" / "adapters").iterdir()} - {".gitignore"}) == ["sft"]
    assert not (project / "outputs" / "checkpoints" / "sft").exists()
    from tunepipe.tracking import store

    client = store.connect(project)[0]
    experiment = client.search_experiments()[0].experiment_id
    runs = client.search_runs([experiment], "tags.`tunepipe.stage` = 'train-sft'")
    assert len(runs) == 1

    # the same global batch on one process: the same adapter (up to float summation order)
    plan = yaml.safe_load((project / "outputs" / "params.yaml").read_text())
    section = read_section(plan, "train-sft")
    single = section.model_copy(update={"train": section.train.model_copy(update={
        "launcher": "none", "nproc_per_node": None, "per_device_train_batch_size": GLOBAL_BATCH})})
    out = tmp_path_factory.mktemp("single")
    paths = recipe.StagePaths(input_model=str(project / "outputs/models/base"),
                              tokenizer=str(project / "outputs/models/base"), data=project / "outputs/data/sft",
                              adapter=out / "adapter", checkpoints=out / "checkpoints",
                              metrics=out / "metrics.json", plots=out / "plots")
    one = recipe.run_stage(single, paths)
    reference = adapter(out / "adapter")
    two = adapter(project / "outputs" / "adapters" / "sft")
    assert reference.keys() == two.keys()
    for name, tensor in reference.items():
        assert torch.allclose(two[name], tensor, atol=1e-6), name
    assert one["train_loss"] == pytest.approx(metrics["train_loss"], rel=1e-5)
    assert one["tokens"] == metrics["tokens"]  # summed over the processes

    # accelerate launch with LLaMA-Factory's FSDP2 config (bf16 -> no, use_cpu): the command from dvc.yaml, run as
    # DVC would run it. accelerate enables FSDP on accelerators only; on CPU the 2 processes are plain data parallel
    # (and the stage says so).
    source = LF_EXAMPLES / "accelerate__fsdp2_config.yaml"
    if not source.is_file():
        return
    config = {**yaml.safe_load(source.read_text()), **FSDP_CPU}
    (project / "fsdp2.yaml").write_text(yaml.safe_dump(config))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["stages"]["sft"].update(launcher="accelerate", config_file="fsdp2.yaml", nproc_per_node=None)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TUNEPIPE_TRACKING": "0"}
    for step in (["python", "-m", "stages.dag"], ["python", "-m", "stages.params"]):
        subprocess.run(step, cwd=project, env=env, check=True, capture_output=True, timeout=120)
    cmd = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["train-sft"]["cmd"]
    assert cmd == "accelerate launch --config_file fsdp2.yaml -m stages.train sft"
    proc = subprocess.run(shlex.split(cmd), cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr and "FSDP is not used on CPU" in proc.stderr
    fsdp = adapter(project / "outputs" / "adapters" / "sft")
    for name, tensor in reference.items():
        assert torch.allclose(fsdp[name], tensor, atol=1e-6), name


def test_checkpoints_survive_a_change_of_launch_address_not_of_config(tiny, tmp_path):
    """The resume fingerprint ignores how processes are started (their number counts, as world_size), but not
    a DeepSpeed / accelerate config, whose checkpoints differ."""
    from tests.test_training import make_inputs, paths
    from tunepipe.train.resume import run_fingerprint

    where = paths(tiny, tmp_path, tmp_path, "sft")
    base = run_fingerprint(make_inputs("sft"), where)
    moved = run_fingerprint(make_inputs("sft", launcher="torchrun", master_addr="10.0.0.2", master_port=29555), where)
    assert moved == base
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    with_ds = run_fingerprint(make_inputs("sft", deepspeed=str(tmp_path / "ds.json")), where)
    assert with_ds != base
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    assert run_fingerprint(make_inputs("sft", deepspeed=str(tmp_path / "ds.json")), where) != with_ds
