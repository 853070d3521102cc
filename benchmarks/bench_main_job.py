"""What each Dagster run of the main job costs beyond its own work: the same cheap step (`prompt_sets`, ~0.3 s of
work) run N times as `dagster asset materialize` calls (one interpreter each; multiprocess executor, then
in-process) and as the main job's driver runs it (`sae_pipeline.defs.driver`: one interpreter for all N runs,
start-up included), in one sitting. The main job makes ~150 runs on the embedded default.

    python benchmarks/bench_main_job.py --runs 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sae_pipeline.config import artifacts_root

STEP = "prompt_sets"


def _inner(runs: int) -> None:
    """The driver's arm, in its own interpreter: N runs of the step through run_main."""
    import dagster as dg

    from sae_pipeline.defs import defs
    from sae_pipeline.config import load_profile
    from sae_pipeline.defs.driver import Step, run_main

    timings = run_main([Step((STEP,))] * runs, defs, dg.DagsterInstance.get(), load_profile())
    assert all(t.success for t in timings)


def _timed(cmd: list[str], env: dict) -> float:
    clock = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--inner", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        return _inner(args.inner)
    dagster = str(Path(sys.executable).parent / "dagster")
    cli = [dagster, "asset", "materialize", "-m", "sae_pipeline.defs", "--select", STEP]
    with tempfile.TemporaryDirectory() as home:
        # a scratch instance and artifact root: the real main job's runs and timings stay untouched
        env = {**os.environ, "DAGSTER_HOME": home, "SAE_PIPELINE_ARTIFACTS": str(Path(home) / "artifacts")}
        arms = {
            "cli_multiprocess": lambda: sum(_timed(cli, {**env, "SAE_PIPELINE_EXECUTOR": "multiprocess"})
                                            for _ in range(args.runs)),
            "cli_in_process": lambda: sum(_timed(cli, {**env, "SAE_PIPELINE_EXECUTOR": "in_process"})
                                          for _ in range(args.runs)),
            "driver_in_process": lambda: _timed([sys.executable, __file__, "--inner", str(args.runs)],
                                                {**env, "SAE_PIPELINE_EXECUTOR": "in_process"}),
        }
        seconds = {name: arm() for name, arm in arms.items()}
    per_run = {name: round(total / args.runs, 2) for name, total in seconds.items()}
    report = {"step": STEP, "runs": args.runs, "seconds_per_run": per_run,
              "cli_multiprocess_over_driver": round(per_run["cli_multiprocess"] / per_run["driver_in_process"], 2),
              "cli_in_process_over_driver": round(per_run["cli_in_process"] / per_run["driver_in_process"], 2)}
    path = artifacts_root() / "benchmarks" / "main_job_overhead.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
