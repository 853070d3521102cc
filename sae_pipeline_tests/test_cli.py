"""`dagster asset materialize` as CI and the README's main script call it, on the tiny profile."""

import os
import subprocess
import sys
from pathlib import Path

from sae_pipeline.config import load_profile
from sae_pipeline.sae.summary import markdown_table, newest_metrics
from sae_pipeline_tests.conftest import write_gates

DAGSTER = str(Path(sys.executable).parent / "dagster")


def _materialize(env, *args):
    cmd = [DAGSTER, "asset", "materialize", "-m", "sae_pipeline.defs", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_cli_materialises_and_exits_non_zero_when_a_blocking_gate_fails(artifacts, tmp_path):
    env = {**os.environ, "SAE_PIPELINE_PROFILE": "tiny", "DAGSTER_HOME": str(tmp_path / "dagster_home"),
           "SAE_PIPELINE_GATES": str(write_gates(tmp_path / "pass.yaml", 0.0))}
    (tmp_path / "dagster_home").mkdir()
    assert _materialize(env, "--select", "corpus").returncode == 0
    harvest = _materialize(env, "--select", "activations", "--partition-range", "1...3")
    assert harvest.returncode == 0, harvest.stderr[-2000:]
    assert sorted(p.name for p in artifacts.glob("activations/*/layer_*")) == ["layer_01", "layer_03"]
    passing = _materialize(env, "--select", "sae", "--partition", "1")
    assert passing.returncode == 0, passing.stderr[-2000:]
    env["SAE_PIPELINE_GATES"] = str(write_gates(tmp_path / "fail.yaml", 1.01))
    failing = _materialize(env, "--select", "sae", "--partition", "3")
    assert failing.returncode != 0
    assert "sae_quality" in failing.stdout + failing.stderr
    rows = newest_metrics(artifacts, load_profile("tiny").sae, [1, 3])
    assert [row["layer"] for row in rows] == [1, 3] and [row["gates"] for row in rows] == ["pass", "FAIL"]
    assert "| 3 |" in markdown_table(rows)
