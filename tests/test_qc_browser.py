"""The QC page in a real browser (Debian chromium + playwright): render, rate with the keyboard,
export qc_ratings.tsv, and feed it back through read_ratings/apply_ratings.

Needs ``apt-get install -y chromium`` and ``pip install playwright`` (no ``playwright install``:
the system chromium is used).  Set COHORTSEG_QC_SCREENSHOT=/some/file.png to keep a screenshot.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("COHORTSEG_CHROMIUM", "/usr/bin/chromium")


def _require_browser():
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install -y chromium "
                    "(or set COHORTSEG_CHROMIUM)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("python package 'playwright' missing: pip install playwright "
                    "(no 'playwright install' needed, the system chromium is used)")


@pytest.fixture(scope="module")
def qc_dir(tmp_path_factory):
    """2,000 fake rows + 3 rows with real snapshots/thumbnails, written as a QC page."""
    from cohortseg.qc.page import write_qc_page
    from cohortseg.qc.snapshots import lesion_crops, mosaic, thumbnail

    root = tmp_path_factory.mktemp("out")
    rng = np.random.default_rng(0)
    shape = (48, 48, 12)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    img = (100 + 80 * np.exp(-((x - 24) ** 2 + (y - 24) ** 2) / 300.0)
           + rng.normal(0, 3, shape)).astype(np.float32)
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    mask = ((np.hypot(x - 28, y - 24) <= 4) & (z > 1) & (z < 10)).astype(np.uint8)
    rows = []
    figs = root / "derivatives" / "figures"
    makers = [
        ("sc_gm", lambda p: mosaic(img, mask, aff, p, view="axial", zoom="cord", title="sub-r0")),
        ("brain", lambda p: mosaic(img, mask, aff, p, view="sagittal", zoom="brain")),
        ("cmb", lambda p: lesion_crops(img, mask, aff, p)),
    ]
    for i, (pipe, make) in enumerate(makers):
        full = figs / f"sub-r{i}_{pipe}_qc.png"
        make(full)
        th = thumbnail(full, figs / f"sub-r{i}_{pipe}_qc_thumb.png")
        rows.append({"participant_id": f"sub-r{i}", "session_id": "ses-01", "pipeline": pipe,
                     "status": "ok", "snapshot": str(full), "thumbnail": str(th),
                     "qc_flags": "edge" if i == 1 else "", "gm_volume_mm3": 600000.0 + i})
    pipelines = ["sc_gm", "brain", "cmb", "wmh"]
    for i in range(2000):
        rows.append({"participant_id": f"sub-{i // 4:05d}", "session_id": "ses-01",
                     "pipeline": pipelines[i % 4], "status": "ok" if i % 97 else "failed",
                     "qc_flags": "outlier:gm_volume_mm3" if i % 40 == 3 else "",
                     "gm_volume_mm3": float(rng.normal(6e5, 5e4)), "n_lesions": i % 7})
    write_qc_page(rows, root / "qc", title="browser test QC")
    return root


@pytest.fixture(scope="module")
def browser():
    _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, qc_dir, context=None):
    ctx = context or browser.new_context(viewport={"width": 1400, "height": 900},
                                         accept_downloads=True)
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((qc_dir / "qc" / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    return ctx, page, errors


def test_page_renders_rates_exports(browser, qc_dir, tmp_path):
    from cohortseg.qc.ratings import apply_ratings, read_ratings

    ctx, page, errors = _open(browser, qc_dir)
    # virtualised: only the rows in view (+ overscan) are in the DOM
    n_dom = page.locator("#list .row").count()
    assert 5 <= n_dom <= 60, n_dom
    assert "showing 2,003 of 2,003 rows" in page.inner_text("#counts")
    # the real thumbnails (first rows) load
    page.wait_for_function(
        "Array.from(document.querySelectorAll('#list .row img')).slice(0, 3)"
        ".every(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
    widths = page.eval_on_selector_all("#list .row img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 3 and all(0 < w <= 160 for w in widths)  # thumbnails never upscale
    assert page.locator("#list .row").nth(3).locator(".none").inner_text() == "no snapshot"

    # rater name, then: j (row 1) f (fail, auto-advance to row 2) j (row 3) a (artifact)
    page.fill("#rater", "AB")
    page.press("#rater", "Escape")
    page.keyboard.press("j")
    page.keyboard.press("f")
    page.keyboard.press("j")
    page.keyboard.press("a")
    assert page.evaluate("window.cohortsegQC.current()") == 3  # advanced after 'a'
    sel = page.locator("#list .row.r-fail .pid").all_inner_texts()
    assert sel == ["sub-r0"]
    assert page.locator("#list .row.r-artifact .pid").all_inner_texts() == ["sub-r2"]
    assert "rated 2 (pass 0 \u00b7 fail 1 \u00b7 artifact 1)" in page.inner_text("#counts")

    # full-size viewer opens on Enter and shows the real image; Escape closes it
    page.keyboard.press("g")  # first row: the axial mosaic
    page.keyboard.press("Enter")
    assert page.is_visible("#viewer")
    page.wait_for_function("document.getElementById('v-img').naturalWidth > 0")
    assert page.evaluate("document.getElementById('v-img').naturalWidth") > 300
    page.keyboard.press("Escape")
    assert not page.is_visible("#viewer")

    # filter box: '/' focuses it; typing narrows the list
    page.keyboard.press("/")
    page.keyboard.type("sub-00042 wmh")
    page.wait_for_function("document.getElementById('counts').textContent.startsWith('showing 1 of')")
    page.fill("#q", "")
    page.wait_for_function("document.getElementById('counts').textContent.startsWith('showing 2,003')")
    page.press("#q", "Escape")

    # ratings survive a reload (localStorage)
    page.reload()
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#list .row.r-fail .pid").all_inner_texts() == ["sub-r0"]

    shot = tmp_path / "qc_page.png"
    page.screenshot(path=str(shot))
    if os.environ.get("COHORTSEG_QC_SCREENSHOT"):
        shutil.copy(shot, os.environ["COHORTSEG_QC_SCREENSHOT"])

    # export with the key, capture the download
    with page.expect_download() as dl:
        page.keyboard.press("e")
    download = dl.value
    assert download.suggested_filename == "qc_ratings.tsv"
    tsv = tmp_path / "qc_ratings.tsv"
    download.save_as(str(tsv))
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t") == ["participant_id", "session_id", "pipeline", "rating",
                                    "rater", "timestamp"]
    body = [l.split("\t") for l in lines[1:]]
    assert [b[:5] for b in body] == [["sub-r0", "ses-01", "sc_gm", "fail", "AB"],
                                     ["sub-r2", "ses-01", "cmb", "artifact", "AB"]]
    assert all(pd.Timestamp(b[5]).tzinfo is not None for b in body)

    # the Export button gives the same file
    with page.expect_download() as dl2:
        page.click("#export")
    assert Path(dl2.value.path()).read_text() == tsv.read_text()
    assert errors == []
    ctx.close()

    # back in Python: the two rows are flagged in the summary table
    summary = pd.DataFrame({
        "participant_id": ["sub-r0", "sub-r1", "sub-r2", "sub-00000"],
        "session_id": ["ses-01"] * 4,
        "pipeline": ["sc_gm", "brain", "cmb", "sc_gm"],
    })
    out = apply_ratings(summary, read_ratings(tsv))
    assert out["qc_rating"].tolist() == ["fail", "unrated", "artifact", "unrated"]


def test_ratings_are_keyed_by_page(browser, qc_dir, tmp_path):
    """Two QC pages opened from file:// share localStorage; their ratings must not mix."""
    from cohortseg.qc.page import write_qc_page

    other = tmp_path / "other_qc"
    write_qc_page([{"participant_id": "sub-r0", "session_id": "ses-01", "pipeline": "sc_gm",
                    "status": "ok"}], other)
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    page.goto((other / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    page.keyboard.press("j")
    page.keyboard.press("p")
    assert page.locator(".row.r-pass").count() == 1
    key_other = page.evaluate("window.cohortsegQC.storageKey")
    page.goto((qc_dir / "qc" / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']")
    assert page.evaluate("window.cohortsegQC.storageKey") != key_other
    assert page.locator("#list .row.r-pass").count() == 0
    ctx.close()


def test_status_filter_documents_the_vocabulary(browser, tmp_path):
    """The cohort page (workflow.report) lists the status vocabulary with its meaning in the status
    filter; choosing no_input shows the participants never scanned for a pipeline, not the failures."""
    from cohortseg.qc.page import write_qc_page
    from cohortseg.workflow.records import STATUS_HELP

    rows = [{"participant_id": f"sub-{i}", "session_id": "", "pipeline": "sc_gm", "status": st, "error": err}
            for i, (st, err) in enumerate([("ok", ""), ("failed", "image is all zeros"),
                                           ("refused", "no spinal cord in the field of view: ..."), ("no_input", "")])]
    write_qc_page(rows, tmp_path / "qc", statuses=STATUS_HELP)
    page = browser.new_page()
    page.goto((tmp_path / "qc" / "index.html").as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=15_000)
    options = page.locator("#f-status option").all_inner_texts()
    assert options[0] == "any status" and [o.split(":")[0] for o in options[1:]] == list(STATUS_HELP)
    assert "no_input: nothing matching was acquired: not an error" in options
    page.select_option("#f-status", "no_input")
    assert page.locator("#list .row .pid").all_inner_texts() == ["sub-3"]
    assert page.locator("#list .row .st").first.get_attribute("class") == "st none"
    page.select_option("#f-status", "refused")
    assert page.locator("#list .row .pid").all_inner_texts() == ["sub-2"]
    page.close()


def _cohort_rows(n_sessions, pipelines=("sc_gm", "sc_csa", "brain_tissue")):
    rng = np.random.default_rng(1)
    return [{"participant_id": f"sub-{i:06d}", "session_id": "", "pipeline": p,
             "status": "ok" if i % 53 else "failed", "error": "" if i % 53 else "image is all zeros",
             "qc_flags": "outlier:x" if i % 41 == 0 else "", "metrics": {"volume_mm3": float(rng.normal(700, 50)),
                                                                          "n_slices": 9}}
            for p in pipelines for i in range(n_sessions)]


def test_a_large_cohort_gets_pages_that_share_ratings_and_export(browser, tmp_path):
    """Past page_rows the cohort page is an index of pages of one pipeline each; a rating given on
    one page and one on another come out of one export (from file://)."""
    from cohortseg.qc.page import write_qc_pages
    from cohortseg.qc.ratings import read_ratings

    index = write_qc_pages(_cohort_rows(700), tmp_path / "qc", page_rows=500)
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    page.goto(index.as_uri())
    links = page.locator("#pages a").all_inner_texts()
    assert links == [f"page-{p}-00{n}.html" for p in ("sc_gm", "sc_csa", "brain_tissue") for n in (1, 2)]
    page.click("text=page-sc_csa-002.html")
    page.wait_for_selector("body[data-ready='1']")
    assert "showing 200 of 200 rows" in page.inner_text("#counts") and page.is_visible("#index-link")
    page.keyboard.press("j")
    page.keyboard.press("f")  # sub-000500 sc_csa
    page.click("#index-link")
    page.click("text=page-sc_gm-001.html")
    page.wait_for_selector("body[data-ready='1']")
    page.keyboard.press("j")
    page.keyboard.press("p")  # sub-000000 sc_gm
    assert "rated 2 (pass 1 \u00b7 fail 1" in page.inner_text("#counts")
    with page.expect_download() as dl:
        page.keyboard.press("e")
    tsv = tmp_path / "qc_ratings.tsv"
    dl.value.save_as(str(tsv))
    got = read_ratings(tsv)[["participant_id", "pipeline", "rating"]].values.tolist()
    assert sorted(got) == [["sub-000000", "sc_gm", "pass"], ["sub-000500", "sc_csa", "fail"]]
    ctx.close()


@pytest.mark.slow
def test_qc_pages_of_100000_sessions(browser, tmp_path):
    """Benchmark figures (printed, not asserted): 100,000 sessions x 3 pipelines written as pages,
    the largest opened from file:// and filtered."""
    import time

    from cohortseg.qc.page import PAGE_ROWS, write_qc_pages

    rows = _cohort_rows(100_000)
    t0 = time.perf_counter()
    index = write_qc_pages(rows, tmp_path / "qc")
    written = time.perf_counter() - t0
    pages = sorted((tmp_path / "qc").glob("page-*.html"))
    assert len(pages) == 3 * -(-100_000 // PAGE_ROWS)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    t0 = time.perf_counter()
    page.goto(pages[0].as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=60_000)
    opened = time.perf_counter() - t0
    assert page.evaluate("window.cohortsegQC.rows.length") == PAGE_ROWS
    page.fill("#q", "sub-001")
    page.wait_for_function("window.cohortsegQC.view().length === 1000")  # sub-001000 .. sub-001999
    filter_ms = page.evaluate("window.cohortsegQC.lastFilterMs")
    print(f"\n300,000 rows: written in {written:.2f} s ({sum(p.stat().st_size for p in pages) / 1e6:.0f} MB, "
          f"{len(pages)} pages); a page of {PAGE_ROWS:,} rows ({pages[0].stat().st_size / 1e6:.1f} MB) opened in "
          f"{opened:.2f} s, filtered in {filter_ms:.0f} ms (load {os.getloadavg()[0]:.1f})")
    assert index.read_text().count("<a href=") == len(pages)
    page.close()
