"""The Dagster UI in headless Chromium: the asset graph and an SAE materialisation with its figures. Screenshots go
to artifacts/test-output/ui/ (or SAE_PIPELINE_TEST_OUTPUT), never into git."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.config import load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline_tests.conftest import write_gates

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Chromium as the machine's own probe starts it: no sandbox as root, and no background traffic a closed network
# would refuse
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WEBSERVER = str(Path(sys.executable).parent / "dagster-webserver")
SCREENSHOTS = Path(os.environ.get("SAE_PIPELINE_TEST_OUTPUT", Path(__file__).resolve().parents[1] / "artifacts" /
                                  "test-output")) / "ui"


def _require_browser():
    """CI sets SAE_PIPELINE_REQUIRE_UI=1, so a missing browser fails there instead of skipping."""
    missing = [what for what, ok in (("chromium", Path(CHROMIUM).exists()),
                                     ("playwright", _importable("playwright"))) if not ok]
    if missing and os.environ.get("SAE_PIPELINE_REQUIRE_UI") == "1":
        pytest.fail(f"the UI test needs {missing} (scripts/install.sh installs them)")
    if missing:
        pytest.skip(f"the UI test needs {missing}")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"dagster-webserver exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"dagster-webserver did not answer at {url} within {seconds} s")


def _dismiss_dialog(page) -> None:
    """The first visit may open Dagster's newsletter dialog over the page."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.get_by_role("button", name="Skip").click(timeout=4000)
    except PlaywrightTimeout:
        pass


def test_the_ui_shows_the_asset_graph_and_an_sae_materialisation_with_its_figures(artifacts, tmp_path,
                                                                                    monkeypatch):
    _require_browser()
    from playwright.sync_api import sync_playwright

    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {"DAGSTER_HOME": str(home), "SAE_PIPELINE_PROFILE": "tiny",
           "SAE_PIPELINE_GATES": str(write_gates(tmp_path / "gates.yaml", 0.0))}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    defs = build_defs(load_profile("tiny"))
    instance = dg.DagsterInstance.get()
    for selection, partition in ((["corpus"], None), (["activations"], "1"), (["sae"], "1")):
        assert dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
                              resources=defs.resources, partition_key=partition).success
    [record] = instance.fetch_materializations(dg.AssetKey("sae"), limit=1).records
    r2 = record.asset_materialization.metadata["r2"].value

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([WEBSERVER, "-m", "sae_pipeline.defs", "-h", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    try:
        _wait_until_serving(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})

            page.goto(f"{url}/locations/sae_pipeline.defs/asset-groups/foundation", wait_until="networkidle",
                      timeout=120_000)
            _dismiss_dialog(page)
            for node in ("corpus", "activations", "sae"):  # the graph's nodes, with their downstream links
                page.get_by_text(node, exact=True).first.wait_for(timeout=30_000)
            assert page.get_by_text("feature_scores", exact=True).count() >= 1
            page.screenshot(path=str(SCREENSHOTS / "asset_graph.png"))

            page.goto(f"{url}/assets/sae?partition=1", wait_until="networkidle", timeout=120_000)
            _dismiss_dialog(page)
            r2_row = page.locator("tr", has=page.get_by_text("r2", exact=True))
            assert str(r2) in r2_row.first.inner_text()
            for key in ("dead_fraction", "coherence_p95", "training_curve", "l1_sweep"):
                assert page.get_by_text(key, exact=True).count() >= 1, key
            page.locator("tr", has_text="liveness_histogram").get_by_text("[Show Markdown]").click()
            figure = page.locator("img[src^='data:image/png']").first
            figure.wait_for(timeout=30_000)
            width, height = figure.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert width > 200 and height > 150
            page.screenshot(path=str(SCREENSHOTS / "sae_materialisation.png"))
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert (SCREENSHOTS / "asset_graph.png").stat().st_size > 10_000
