"""`tunepipe params` (value in effect and default per key) and `tunepipe validate` on a project."""

from __future__ import annotations

import json

import yaml

from tests.conftest import DEMO_PARAMS_YAML, ROOT, cli


def project(tmp_path, extra: dict | None = None):
    params = yaml.safe_load(DEMO_PARAMS_YAML)
    params["data"] = {"dataset_dir": str(ROOT / "data"), "cutoff_len": 64}
    params["stages"]["sft"]["learning_rate"] = 1e-3
    params.update(extra or {})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "flows").mkdir()
    (tmp_path / "flows" / "pipeline.py").write_text("")
    return tmp_path


def test_params_shows_values_in_effect_and_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project(tmp_path))
    code, out, err = cli(monkeypatch, capsys, "params")
    lines = [line.split() for line in out.splitlines()]
    assert code == 0 and lines[0] == ["key", "in", "effect", "default"]
    rows = {line[1] if line[0] == "*" else line[0]: line for line in lines[1:]}
    assert rows["data.cutoff_len"] == ["*", "data.cutoff_len", "64", "512"]
    assert rows["model.model_name_or_path"] == ["*", "model.model_name_or_path", "tiny", "(required)"]
    # defaults resolved from the stages and the project: shown although not written
    assert rows["registry.compare_metric"] == ["registry.compare_metric", "final.reward_accuracy", "null"]
    assert rows["registry.model_name"] == ["registry.model_name", "tunepipe", "null"]
    assert rows["stages.sft.learning_rate"] == ["*", "stages.sft.learning_rate", "0.001", "=", "train.learning_rate"]
    assert "train.max_steps" not in rows and len(lines) < 30  # keys at their default only with --all
    assert "more keys at their defaults (--all)" in err
    code, out, _ = cli(monkeypatch, capsys, "params", "train", "--all", "--json")
    train = {r["key"]: r for r in json.loads(out)}
    assert train["train.max_steps"] == {"key": "train.max_steps", "value": "-1", "default": "-1", "set": False}
    code, out, _ = cli(monkeypatch, capsys, "params", "--keys", "stages.<stage>.val_size")
    assert out.startswith("stages.<stage>.val_size  = data.val_size") and "LLaMA-Factory's val_size" in out


def test_validate_reports_ok(tmp_path, monkeypatch, capsys):
    root = project(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "validate", "--project", str(root))
    assert code == 0 and err == f"{root / 'params.yaml'}: ok\n"
