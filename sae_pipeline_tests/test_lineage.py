"""Blocking checks block across runs: a stage reads its upstream only if the upstream's blocking checks passed on
the very materialisation it reads (`defs.lineage.passing_metadata`)."""

import dagster as dg
import pytest

from sae_pipeline.defs.lineage import passing_metadata
from sae_pipeline_tests.conftest import step_failure

# what the checks say on the next materialisation, per partition and for "evaluation" (None: the step fails first)
VERDICTS: dict[str, bool | None] = {}


@dg.asset(partitions_def=dg.StaticPartitionsDefinition(["a", "b"]),
          check_specs=[dg.AssetCheckSpec("redaction", asset="arms", blocking=True)])
def arms(context: dg.AssetExecutionContext):
    """As the harness arms: the check's result comes with the materialisation (none when the step fails first)."""
    if VERDICTS[context.partition_key] is None:
        raise dg.Failure("failed before materialising")
    yield dg.MaterializeResult(metadata={"path": f"/made/{context.partition_key}"}, check_results=[
        dg.AssetCheckResult(check_name="redaction", passed=VERDICTS[context.partition_key])])


@dg.asset
def evaluation() -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata={"path": "/made/evaluation"})


@dg.asset_check(asset=evaluation, name="gates", blocking=True)
def gates() -> dg.AssetCheckResult:
    """As the evaluations' gates: a check of its own."""
    return dg.AssetCheckResult(passed=VERDICTS["evaluation"])


@dg.asset(deps=[arms, evaluation])
def release(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    read = [passing_metadata(context.instance, arms.key, ["redaction"], "b")["path"],
            passing_metadata(context.instance, evaluation.key, ["gates"])["path"]]
    return dg.MaterializeResult(metadata={"read": ",".join(read)})


def _run(selection: dg.AssetSelection, instance, partition=None):
    return dg.materialize([arms, evaluation, gates, release], selection=selection, instance=instance,
                          partition_key=partition, raise_on_error=False)


EVALUATED = dg.AssetSelection.assets(evaluation) | dg.AssetSelection.checks(gates)


def test_a_failed_blocking_check_blocks_the_next_run_and_a_passing_one_releases_it():
    with dg.instance_for_test() as instance:
        VERDICTS.update(a=True, b=False, evaluation=False)
        assert not _run(dg.AssetSelection.assets(arms), instance, "b").success  # blocked within its own run
        assert _run(dg.AssetSelection.assets(arms), instance, "a").success  # another partition passed
        VERDICTS.update(a=None)
        assert not _run(dg.AssetSelection.assets(arms), instance, "a").success  # its check planned, never run
        assert not _run(EVALUATED, instance).success
        blocked = _run(dg.AssetSelection.assets(release), instance)
        assert not blocked.success
        assert "arms partition b: its blocking check redaction failed" in step_failure(blocked)

        VERDICTS.update(b=True)
        assert _run(dg.AssetSelection.assets(arms), instance, "b").success
        assert "evaluation: its blocking check gates failed" in step_failure(_run(dg.AssetSelection.assets(release),
                                                                              instance))
        VERDICTS.update(evaluation=True)
        assert _run(EVALUATED, instance).success
        made = _run(dg.AssetSelection.assets(release), instance)
        assert made.success
        assert made.get_asset_materialization_events()[0].materialization.metadata["read"].value == \
            "/made/b,/made/evaluation"


def test_a_check_that_never_ran_on_the_materialisation_read_blocks_too():
    with dg.instance_for_test() as instance:
        VERDICTS.update(b=True, evaluation=True)
        assert _run(dg.AssetSelection.assets(arms), instance, "b").success
        assert _run(EVALUATED, instance).success
        assert _run(dg.AssetSelection.assets(evaluation).without_checks(), instance).success  # its check left out
        blocked = _run(dg.AssetSelection.assets(release), instance)
        assert not blocked.success and "evaluation: its blocking check gates never ran" in step_failure(blocked)


def test_an_upstream_never_materialised_is_named():
    with dg.instance_for_test() as instance, pytest.raises(dg.Failure, match="arms partition b has no "):
        passing_metadata(instance, arms.key, ["redaction"], "b")
