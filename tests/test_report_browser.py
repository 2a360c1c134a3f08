"""The report's HTML in headless Chromium: it loads without console errors, its plots decode, and a screenshot
of the first plot matches the PNG it embeds. The checker itself is shown to fail on broken pages.

Needs Debian's chromium + chromium-driver and selenium; skipped without them, except where REQUIRE_BROWSER=1
(CI sets it, so the check cannot pass by being skipped)."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess

import pytest

from slurm import report
from tests.report_browser import BrowserMissing, check_report, find_browser, png_pixels
from tests.test_report import curve, write_run


def install_browser() -> bool:
    """As root with apt-get (as tests/cluster/up.sh installs Slurm): install Debian's chromium + chromium-driver,
    so the tier runs rather than skips. INSTALL_TEST_PACKAGES=0 turns it off."""
    if os.environ.get("INSTALL_TEST_PACKAGES", "1") == "0" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    if not shutil.which("apt-get"):
        return False
    print("test_report_browser: installing chromium chromium-driver (apt-get, first use only)", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]):
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=900).returncode:
            return False
    return True


try:
    find_browser()
    MISSING = None
except BrowserMissing as e:
    MISSING = str(e)
    if install_browser():
        try:
            find_browser()
            MISSING = None
        except BrowserMissing as again:
            MISSING = str(again)

if MISSING and os.environ.get("REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"REQUIRE_BROWSER=1 but {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")


@pytest.fixture(scope="module")
def built_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    for seed, final in ((1, 3.25), (2, 3.26)):
        write_run(root / "runs" / f"base{seed}", seed=seed, vals=curve(final, time_scale=2.0))
        write_run(root / "runs" / f"mod{seed}", trainer="modded", seed=seed, vals=curve(final - 0.05))
    summary = report.main([str(root / "runs"), "--out", str(root / "out")])
    return root, summary


def test_report_opens_without_errors_and_first_plot_matches_its_png(built_report):
    root, summary = built_report
    seen = check_report(summary["files"]["html"], root / "first_plot.png")
    assert seen["title"] == "Training report"
    assert seen["errors"] == []
    assert seen["headings"][:2] == ["Groups", "Speedup over the baseline"]
    assert len(seen["images"]) == len(summary["files"]["plots"]) == 2
    # The screenshot is the first plot (val loss vs time) as the browser drew it.
    first_png = open(summary["files"]["plots"][0], "rb").read()
    assert tuple(seen["png_size"]) == png_pixels(first_png).shape[:2]
    assert seen["mean_abs_diff"] < 0.06 and seen["screenshot_ink"] > 0.005
    assert png_pixels((root / "first_plot.png").read_bytes()).shape[:2] == tuple(seen["screenshot_size"])


def page(tmp_path, body: str) -> str:
    path = tmp_path / "page.html"
    path.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title></head><body>{body}</body></html>")
    return str(path)


def embedded(png_path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(open(png_path, "rb").read()).decode()


def test_checker_fails_on_a_console_error(built_report, tmp_path):
    _, summary = built_report
    html = page(tmp_path, f"<img src='{embedded(summary['files']['plots'][0])}'><script>undefined_function()</script>")
    with pytest.raises(AssertionError, match="console errors"):
        check_report(html)


def test_checker_fails_on_a_broken_image(tmp_path):
    html = page(tmp_path, "<img src='data:image/png;base64,bm90IGEgcG5n'>")
    with pytest.raises(AssertionError, match="did not decode"):
        check_report(html)


def test_checker_fails_when_the_plot_is_drawn_differently(built_report, tmp_path):
    _, summary = built_report
    html = page(tmp_path, f"<img style='filter: invert(1)' src='{embedded(summary['files']['plots'][0])}'>")
    with pytest.raises(AssertionError, match="differs from its PNG"):
        check_report(html)


def test_checker_fails_on_a_page_without_plots(tmp_path):
    with pytest.raises(AssertionError, match="no plot"):
        check_report(page(tmp_path, "<p>nothing</p>"))
