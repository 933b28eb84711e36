"""The chain ablation on the demo: does each stage add knowledge without destroying the earlier ones'?

    OMP_NUM_THREADS=1 .venv/bin/python bench/chain.py                     # all variants, markdown table
    OMP_NUM_THREADS=1 .venv/bin/python bench/chain.py full no_cpt --json out.json

Variants (each in a fresh temporary copy of the project, the real stage commands `python -m stages.<name>`, no DVC,
no MLflow; params.yaml as shipped except for what the variant changes):

    full       CPT -> merge -> SFT (+ CPT replay) -> merge -> DPO -> merge  (params.yaml)
    no_cpt     no CPT stage and no CPT text anywhere (SFT replay off): SFT -> DPO on the base model
    no_replay  the full chain without the CPT replay in SFT
    no_merge   the DPO adapter stacked on the un-merged SFT adapter, i.e. the reference is the model *without*
               the SFT adapter (what a stacked LoRA gives TRL's adapter-disabled reference, LF #8974); tunepipe
               always merges, so this is emulated: DPO's reference = the CPT model, policy = CPT + SFT adapter
    sft_only   SFT alone on the base model (no CPT, no replay, no DPO)
    cpt@N      the CPT stage alone, N epochs: how much of the knowledge the CPT model holds (asked in the chat
               format with no SFT) — the curve behind the cpt-only target

Reported per variant: fact accuracy by kind (sft-taught, dpo-taught, cpt-only) of the final model, held-out CPT
perplexity and its ratio to the CPT model's, the SFT loss ratio final / SFT model, preference accuracy of the SFT and
final models, the sum of trainer_seconds, and the wall time of the whole variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ("data", "stages", "tunepipe", "params.yaml")


def variant_params(name: str, params: dict) -> dict:
    stages = params["stages"]
    if name.startswith("cpt@"):  # the CPT model alone after N epochs (the knowledge curve)
        stages["cpt"]["num_train_epochs"] = float(name[4:])
        stages["sft"]["enabled"] = stages["dpo"]["enabled"] = False
        return params
    if name in ("no_cpt", "sft_only"):
        stages["cpt"]["enabled"] = False
        stages["sft"]["replay_ratio"] = 0.0
    if name == "no_replay":
        stages["sft"]["replay_ratio"] = 0.0
    if name == "sft_only":
        stages["dpo"]["enabled"] = False
    return params


def stage_commands(params: dict, name: str) -> list[list[str]]:
    enabled = [s for s in ("cpt", "sft", "dpo") if params["stages"][s].get("enabled", True)]
    cmds = [["stages.params"], ["stages.base"], *[["stages.prepare", s] for s in enabled]]
    for stage in enabled:
        cmds += [["stages.train", stage], ["stages.merge", stage]]
    return cmds + [["stages.evaluate"]]


NO_MERGE_HOOK = """
import sys
from tunepipe.train import recipe
_setup = recipe.setup
def setup(inputs, paths, callbacks=()):
    run = _setup(inputs, paths, callbacks)
    if inputs.stage == "dpo":  # the stacked-adapter reference: the model without the SFT adapter (= the CPT model)
        import torch
        from transformers import AutoModelForCausalLM
        from trl.trainer.dpo_trainer import add_fused_lm_head
        ref = AutoModelForCausalLM.from_pretrained(sys.argv_ref, dtype=torch.float32)
        ref.config.use_cache = False
        add_fused_lm_head(ref)
        run.trainer.ref_model = run.trainer.accelerator.prepare_model(ref.eval(), evaluation_mode=True)
        run.notes.append("no_merge: reference = " + sys.argv_ref)
    return run
recipe.setup = setup
"""


def run_variant(name: str, workdir: Path, env: dict) -> dict:
    project = workdir / name
    for item in COPY:
        src = ROOT / item
        (shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
         if src.is_dir() else shutil.copy(src, project / item))
    params = variant_params(name, yaml.safe_load((project / "params.yaml").read_text()))
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**env, "DVC_ROOT": str(project), "TUNEPIPE_TRACKING": "0"}
    start = time.perf_counter()
    for cmd in stage_commands(params, name):
        if name == "no_merge" and cmd == ["stages.train", "dpo"]:
            code = (f"import sys; sys.argv_ref = {str(project / 'outputs/models/cpt')!r}; sys.argv = "
                    f"['stages.train', 'dpo']\n" + NO_MERGE_HOOK + "\nimport runpy; "
                    "runpy.run_module('stages.train', run_name='__main__')")
            argv = [sys.executable, "-c", code]
        else:
            argv = [sys.executable, "-m", *cmd]
        proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name}: {' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - start
    metrics = json.loads((project / "metrics" / "evaluate.json").read_text())
    logs = project / "outputs" / "logs"
    train = {s: json.loads((logs / f"train_{s}.measured.json").read_text())
             for s in ("cpt", "sft", "dpo") if (logs / f"train_{s}.measured.json").exists()}
    samples = json.loads((project / "metrics" / "samples.json").read_text())
    final = metrics["final"]
    forgetting = metrics.get("forgetting", {})
    row = {
        "variant": name,
        "fact_sft": final.get("fact_accuracy_sft"), "fact_dpo": final.get("fact_accuracy_dpo"),
        "fact_cpt": final.get("fact_accuracy_cpt"),
        "perplexity": final.get("perplexity"),
        "ppl_ratio": forgetting.get("perplexity_ratio", {}).get("final"),
        "sft_loss_ratio": forgetting.get("sft_loss_ratio", {}).get("final"),
        "pref_sft": metrics.get("sft", {}).get("pref_accuracy"), "pref_final": final.get("pref_accuracy"),
        "trainer_seconds": round(sum(t["trainer_seconds"] for t in train.values()), 1),
        "wall_seconds": round(wall, 1),
        "per_model": {m: {k: v for k, v in metrics[m].items() if k.startswith("fact_accuracy")}
                      for m in metrics if m not in ("final", "checks", "forgetting", "counts")},
        "samples": {m: [s for s in v if "kind" in s] for m, v in samples.items()},
    }
    return row


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    head = ("| variant | fact acc. sft-taught | dpo-taught | cpt-only | CPT ppl (final / cpt model) | SFT loss "
            "final / sft | pref. acc. sft → final | trainer s | wall s |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['fact_sft'])} | {fmt(r['fact_dpo'])} | {fmt(r['fact_cpt'])} | "
                     f"{fmt(r['perplexity'], 1)} ({fmt(r['ppl_ratio'])}x) | {fmt(r['sft_loss_ratio'])} | "
                     f"{fmt(r['pref_sft'])} → {fmt(r['pref_final'])} | {r['trainer_seconds']} | "
                     f"{r['wall_seconds']} |")
    return "\n".join(lines)


VARIANTS = ("full", "no_cpt", "no_replay", "no_merge", "sft_only")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", default=list(VARIANTS),
                    help=f"{', '.join(VARIANTS)} or cpt@EPOCHS (default: the five chain variants)")
    ap.add_argument("--json", type=Path, help="write the rows (with per-model fact accuracy and samples) here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects")
    args = ap.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS and not v.startswith("cpt@")]
    if bad:
        ap.error(f"unknown variant(s) {bad}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH")]))
    workdir = Path(tempfile.mkdtemp(prefix="tunepipe-chain-"))
    rows = []
    try:
        for name in args.variants:
            rows.append(run_variant(name, workdir, env))
            print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
            if args.json:  # after every variant: a later failure keeps what was measured
                args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
