"""The Prefect UI in a real browser: headless Chromium (Debian's ``chromium``; ``.ci/run``
installs it) driven over the DevTools protocol by Playwright, against the suite's Prefect
server, which serves the UI. The demo consortium trains (small), then the flow run page,
the training report and the round-metrics table are opened: the report's plots load and the
round and party names show. Screenshots go to ``docs/screenshots/``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

pytestmark = pytest.mark.prefect

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "chrome")

#: Texts each page (and tab of the flow run page) must show; tighten them as runs get more
#: readable names (``site-b: train round 3``, a party column in the runs list).
FLOW_RUN_TEXTS = {
    "Logs": ("federated-training", "party site-a"),
    "Subflow Runs": ("round 1", "round 2"),
    "Artifacts": ("round 2 of at most 2 done; evaluated at: site-a, site-b", "best round"),
}
REPORT_TEXTS = ("fedfuse training report", "round 1", "site-a", "reports/")
METRICS_TEXTS = ("round 1", "all parties", "site-a", "site-b", "best")
QUALITY_TEXTS = ("site-a", "transactions", "2 rows: column 'cust_ref' (customer_id): required")
#: Milliseconds a page may take to show what it must.
WAIT_MS = 20_000


def _chromium() -> str:
    """The system Chromium (``FEDFUSE_CHROMIUM`` names another). Missing: a failure in CI
    (``.ci/run`` installs it), a skip elsewhere."""
    found = os.environ.get("FEDFUSE_CHROMIUM") or next(
        (path for name in CHROMIUM if (path := shutil.which(name))), None
    )
    if found is None:
        message = "no Chromium found: apt-get install -y chromium (or set FEDFUSE_CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture
def page() -> Iterator[Any]:
    """A fresh browser page; browser and driver always stopped."""
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()


def _artifact_ids(flow_run_id: UUID) -> dict[str, UUID]:
    """The artifacts of the run and its subflow runs by key (latest version of each)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])
            )
        )
        runs = [flow_run_id, *(run.id for run in children)]
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=runs))
        )
    return {a.key: a.id for a in sorted(artifacts, key=lambda a: str(a.created)) if a.key}


def _artifact(artifacts: dict[str, UUID], suffix: str) -> UUID:
    return next(i for key, i in artifacts.items() if key.endswith(suffix))


def _shows(page: Any, texts: tuple[str, ...]) -> None:
    for text in texts:
        page.wait_for_function(
            "t => document.body.innerText.toLowerCase().includes(t.toLowerCase())",
            arg=text,
            timeout=WAIT_MS,
        )


def _open(page: Any, url: str, texts: tuple[str, ...], screenshot: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    _check(page, texts, screenshot)


def _check(page: Any, texts: tuple[str, ...], screenshot: str) -> None:
    try:
        _shows(page, texts)
    finally:
        page.screenshot(path=str(SCREENSHOTS / screenshot), full_page=True)


def test_the_ui_shows_the_training_report_with_its_plots(
    prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: Any
) -> None:
    from flows.horizontal import federated_training
    from tasks.demo_data import write_demo_consortium

    monkeypatch.setenv("FEDFUSE_SECRET", "0123456789abcdef0123456789abcdef")
    spec = write_demo_consortium(str(tmp_path / "demo"), parties=2, customers=400, seed=3)
    state = federated_training(spec, rounds=2, return_state=True)
    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    artifacts = _artifact_ids(run_id)
    base = prefect_api.removesuffix("/api")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    page.goto(f"{base}/runs/flow-run/{run_id}", wait_until="domcontentloaded")
    for tab, texts in FLOW_RUN_TEXTS.items():
        page.get_by_text(tab, exact=True).first.click(timeout=WAIT_MS)
        _check(page, texts, f"flow-run-{tab.lower().replace(' ', '-')}.png")

    report = _artifact(artifacts, "-training-report")
    _open(page, f"{base}/artifacts/artifact/{report}", REPORT_TEXTS, "report.png")
    page.wait_for_function(
        "() => { const i = [...document.images].filter(i => i.src.startsWith('data:image/'));"
        " return i.length >= 2 && i.every(i => i.complete); }",
        timeout=WAIT_MS,
    )
    # every image of the page loads (a link into a store would not), both plots among them
    images = page.evaluate("[...document.images].map(i => [i.alt, i.naturalWidth])")
    assert {"validation per round", "importance"} <= {alt for alt, _ in images}
    assert all(width > 0 for _, width in images), images
    page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
    # the report names no local path: artefacts are given relative to the coordinator store
    text = page.evaluate("document.body.innerText")
    assert str(tmp_path) not in text

    metrics = _artifact(artifacts, "-round-metrics")
    _open(page, f"{base}/artifacts/artifact/{metrics}", METRICS_TEXTS, "metrics.png")
    quality = _artifact(artifacts, "-quality")
    _open(page, f"{base}/artifacts/artifact/{quality}", QUALITY_TEXTS, "quality.png")
