"""The README's main job in one process: every stage in dependency order, each partition its own run, as
`dagster asset materialize` makes them (same implicit asset job, partition tags, asset checks and executor), but
without a new interpreter, Dagster import and definitions load for each of the ~150 runs (~9 s each, ~17 s with the
multiprocess executor's step process). A run whose blocking check fails makes the exit status 1 and the job goes on
(the assets downstream refuse to run, with the reason); a failed corpus or harvest stops it, and so do Ctrl-C and
SIGTERM, after the run they interrupt. The partition named `reverse` (reverse-safety, an audit) runs with
STEER_DEBUG=1, and it alone. The wall time of every run is written to `artifacts/benchmarks/main_job_{profile}.json`
(`main_job_{profile}_stages-{a+b}.json` for chosen stages) and printed by stage.

    python -m sae_pipeline.defs.driver [--stages sae,refusal_gate] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.config import Profile, artifacts_root, load_profile
from sae_pipeline.evaluation.harness import REVERSE_ARM

DEFS_MODULE, DEFS_ATTRIBUTE = "sae_pipeline.defs", "defs"



class Step(NamedTuple):
    selection: tuple[str, ...]  # asset names, one run
    partition: str | None = None
    partition_range: tuple[str, str] | None = None  # (first, last): one run over the range (single-run backfill)
    required: bool = False  # what follows cannot run without it: a failure stops the job

    def label(self) -> str:
        part = self.partition or ("...".join(self.partition_range) if self.partition_range else None)
        return ",".join(self.selection) + (f" [{part}]" if part else "")


class StepTiming(NamedTuple):
    selection: tuple[str, ...]
    label: str
    success: bool
    seconds: float


def main_steps(defs: dg.Definitions) -> list[Step]:
    """Every stage of the pipeline in dependency order, one step per partition (in the partitions' own order:
    the ensemble's grid reads the named schedules before it)."""
    def each(*selection: str) -> list[Step]:
        return [Step(selection, key) for key in defs.resolve_assets_def(selection[0]).partitions_def
                .get_partition_keys()]

    layers = defs.resolve_assets_def("activations").partitions_def.get_partition_keys()
    return [
        # frozen datasets -> judges -> baseline metrics: independent of the SAEs
        Step(("prompt_sets", "refusal_judge", "baseline_metrics")),
        Step(("corpus",), required=True),
        # one forward pass feeds every layer
        Step(("activations",), partition_range=(layers[0], layers[-1]), required=True),
        *each("sae"),
        Step(("refusal_gate",)),  # raw activations: no SAE needed
        # on every layer whose SAE passes sae_quality (the others are refused with the reason)
        *each("feature_scores", "feature_ranking", "causal_screen", "sidecars"),
        *each("alpha_sweep"), Step(("operating_point",)),
        Step(("ensemble_directions",)), *each("ensemble_sweep"), Step(("ensemble_metrics",)),
        Step(("behavior_layers",)), *each("behavior_features"), Step(("behavior_crosstalk", "behavior_router")),
        *each("behavior_screen"), Step(("behavior_release",)), *each("behavior_arms"), Step(("behavior_evaluation",)),
        *each("fused_net", "fused_export"), Step(("fused_release",)), *each("fused_arms"),
        Step(("fused_evaluation",)),
        # the release bundle, the nightly smoke's reference for it and one smoke run against it
        Step(("release",)), Step(("smoke_reference",)), Step(("smoke_metrics",)),
        Step(("audit_suite",)), *each("audit_arms"), Step(("audit_evaluation",)),
        Step(("audit_diagnostics", "locale_alphas")),
    ]


@contextmanager
def _steer_debug(on: bool) -> Iterator[None]:
    """STEER_DEBUG=1 for a reverse-safety run alone (its step processes inherit it)."""
    before = os.environ.get("STEER_DEBUG")
    if on:
        os.environ["STEER_DEBUG"] = "1"
    try:
        yield
    finally:
        if on and before is None:
            del os.environ["STEER_DEBUG"]
        elif on:
            os.environ["STEER_DEBUG"] = before


def run_step(defs: dg.Definitions, repository: ReconstructableRepository, instance: dg.DagsterInstance,
             step: Step) -> bool:
    """One run, as `dagster asset materialize --select ... [--partition | --partition-range]` makes it."""
    keys = dg.AssetSelection.assets(*step.selection).resolve(defs.resolve_asset_graph())
    job = defs.resolve_implicit_job_def_def_for_assets(list(keys))
    if job is None:
        raise ValueError(f"{step.selection} do not share one partitioning: they cannot run together")
    tags: dict[str, str] = {}
    if step.partition_range is not None:
        tags = {ASSET_PARTITION_RANGE_START_TAG: step.partition_range[0],
                ASSET_PARTITION_RANGE_END_TAG: step.partition_range[1]}
    elif step.partition is not None:
        tags = dict(job.get_tags_for_partition_key(step.partition, selected_asset_keys=keys))
    with _steer_debug(step.partition == REVERSE_ARM):
        result = dg.execute_job(repository.get_reconstructable_job(job.name), instance=instance,
                                asset_selection=list(keys), tags=tags)
    return result.success


@contextmanager
def _stop_signals() -> Iterator[Callable[[], bool]]:
    """Whether Ctrl-C or SIGTERM came since the last call. Dagster handles them inside a run and may swallow
    them (a signal between its checkpoints only sets a flag it resets when the run ends, and the run succeeds), so
    the signal numbers are read from the interpreter's wakeup fd, which sees every signal whatever the handler."""
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def received() -> bool:
        try:
            numbers = reader.recv(4096)
        except BlockingIOError:
            return False
        return bool({signal.SIGINT, signal.SIGTERM} & set(numbers))

    try:
        yield received
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


def stage_table(timings: Sequence[StepTiming]) -> list[dict]:
    """Wall time per stage (a stage: the runs of one selection), in the job's order."""
    stages: dict[str, dict] = {}
    for t in timings:
        row = stages.setdefault(",".join(t.selection), {"stage": ",".join(t.selection), "runs": 0, "failed": 0,
                                                        "seconds": 0.0})
        row["runs"] += 1
        row["failed"] += not t.success
        row["seconds"] += t.seconds
    total = sum(t.seconds for t in timings) or 1.0
    return [{**row, "seconds": round(row["seconds"], 1), "share": round(row["seconds"] / total, 4)}
            for row in stages.values()]


def markdown(rows: Sequence[dict]) -> str:
    lines = ["| stage | runs | failed | minutes | share |", "|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['runs']} | {r['failed']} | {r['seconds'] / 60:.1f} | {r['share']:.1%} |"
              for r in rows]
    total = sum(r["seconds"] for r in rows)
    return "\n".join(lines + [f"| **total** | {sum(r['runs'] for r in rows)} | | **{total / 60:.1f}** | |"])


def timings_path(profile: Profile, stages: Collection[str] | None) -> Path:
    """The whole job's timings, or a chosen stages' beside them: a partial run never overwrites the whole one's."""
    suffix = f"_stages-{'+'.join(sorted(stages))}" if stages else ""
    return artifacts_root() / "benchmarks" / f"main_job_{profile.name}{suffix}.json"


def write_timings(timings: Sequence[StepTiming], profile: Profile, planned: int, path: Path) -> None:
    report = {"profile": profile.name, "executor": profile.execution.executor, "planned_runs": planned,
              "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "runs": [t._asdict() for t in timings], "stages": stage_table(timings)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")  # a Ctrl-C while writing leaves the last whole file
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(path)


def run_main(steps: Sequence[Step], defs: dg.Definitions, instance: dg.DagsterInstance, profile: Profile,
             stages: Collection[str] | None = None) -> list[StepTiming]:
    """Run the steps in order; the timings file is rewritten after every run, so an interrupted job keeps them."""
    repository = ReconstructableRepository.for_module(DEFS_MODULE, DEFS_ATTRIBUTE, working_directory=os.getcwd())
    timings: list[StepTiming] = []
    with _stop_signals() as stop_requested:
        for number, step in enumerate(steps, 1):
            print(f"main job {number}/{len(steps)}: {step.label()}", flush=True)
            clock = time.perf_counter()
            try:
                succeeded = run_step(defs, repository, instance, step)
            except KeyboardInterrupt:  # outside Dagster's own interrupt handling, e.g. while the run starts
                succeeded = False
            timings.append(StepTiming(step.selection, step.label(), succeeded, time.perf_counter() - clock))
            write_timings(timings, profile, len(steps), timings_path(profile, stages))
            if stop_requested():
                print(f"main job stopped: interrupted during {step.label()}", file=sys.stderr)
                break
            if not succeeded and step.required:
                print(f"main job stopped: {step.label()} failed and the stages after it need it", file=sys.stderr)
                break
    return timings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=None,
                        help="comma-separated first assets of the stages to run (default: all), e.g. sae,refusal_gate")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and stop")
    args = parser.parse_args(argv)
    from sae_pipeline.defs import defs  # the active profile's (SAE_PIPELINE_PROFILE), as the CLI loads it

    steps = main_steps(defs)
    wanted = set(args.stages.split(",")) if args.stages else None
    if wanted:
        unknown = wanted - {s.selection[0] for s in steps}
        if unknown:
            parser.error(f"no stage starts with {sorted(unknown)}; stages: {sorted({s.selection[0] for s in steps})}")
        steps = [s for s in steps if s.selection[0] in wanted]
    if args.dry_run:
        print("\n".join(step.label() for step in steps))
        return 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a scheduler's stop counts as Ctrl-C
    timings = run_main(steps, defs, dg.DagsterInstance.get(), load_profile(), wanted)
    print(markdown(stage_table(timings)))
    return int(len(timings) < len(steps) or not all(t.success for t in timings))


if __name__ == "__main__":
    sys.exit(main())
