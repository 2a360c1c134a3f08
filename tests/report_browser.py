"""Open a report.html in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium):
no console errors, every image decoded, and a screenshot of the first plot that matches the PNG it embeds.

    python -m tests.report_browser runs/demo-.../report/report.html [--screenshot FILE]

Used by tests/test_report_browser.py and by .ci/run on the README's first command's report.
"""

from __future__ import annotations

import argparse
import base64
import io
import shutil
import sys
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)


class BrowserMissing(RuntimeError):
    pass


def find_browser() -> tuple[str, str]:
    """(browser binary, chromedriver) or BrowserMissing naming what to install."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    driver = next((p for p in map(shutil.which, DRIVER_NAMES) if p), None)
    missing = [name for name, path in (("chromium", browser), ("chromium-driver", driver)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium Python package (bash setup_env.sh)")
    if missing:
        raise BrowserMissing("headless browser check needs " + ", ".join(missing) +
                             " (Debian: apt-get install chromium chromium-driver)")
    return browser, driver


def open_browser(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def png_pixels(data: bytes):
    """RGB float array (H, W, 3) in [0, 1] of PNG bytes (matplotlib reads PNGs; no Pillow needed)."""
    import matplotlib.image as mpimg

    pixels = mpimg.imread(io.BytesIO(data), format="png")
    return pixels[..., :3].astype("float64")


def check_report(html_path: str | Path, screenshot: str | Path | None = None) -> dict:
    """Load the page, check it, and return what was seen: title, headings, console messages, images
    (natural and shown size), and the first plot's screenshot vs its embedded PNG (mean absolute pixel
    difference in [0, 1]). Raises AssertionError with the reason when a check fails."""
    import numpy as np
    from selenium.webdriver.common.by import By

    html_path = Path(html_path).resolve()
    if not html_path.is_file():
        raise FileNotFoundError(f"{html_path}: no such report")
    driver = open_browser()
    try:
        driver.get(html_path.as_uri())
        state = driver.execute_script("return document.readyState")
        logs = driver.get_log("browser")
        errors = [entry["message"] for entry in logs if entry["level"] in ("SEVERE", "ERROR")]
        images = driver.find_elements(By.TAG_NAME, "img")
        sizes = [driver.execute_script(
            "const i = arguments[0]; return [i.complete, i.naturalWidth, i.naturalHeight, i.clientWidth, i.clientHeight]",
            image) for image in images]
        seen = {"title": driver.title, "ready": state, "errors": errors, "console": [e["message"] for e in logs],
                "headings": [h.text for h in driver.find_elements(By.TAG_NAME, "h2")], "images": sizes,
                "tables": len(driver.find_elements(By.TAG_NAME, "table"))}
        assert state == "complete", f"page not loaded: readyState {state}"
        assert not errors, f"console errors: {errors}"
        assert images, "no plot in the report"
        broken = [i for i, (complete, w, h, _, _) in enumerate(sizes) if not complete or w == 0 or h == 0]
        assert not broken, f"images that did not decode: {broken}"
        first = images[0]
        driver.execute_script("arguments[0].scrollIntoView(true)", first)
        shot = first.screenshot_as_png
        if screenshot:
            Path(screenshot).write_bytes(shot)
        src = first.get_attribute("src")
        assert src.startswith("data:image/png;base64,"), "the first plot is not an embedded PNG"
        expected = png_pixels(base64.b64decode(src.split(",", 1)[1]))
        got = png_pixels(shot)
        # The browser may scale the image to the page width: compare at the screenshot's size by sampling
        # the embedded PNG at the same relative positions (nearest neighbour).
        rows = (np.arange(got.shape[0]) * expected.shape[0] / got.shape[0]).astype(int)
        cols = (np.arange(got.shape[1]) * expected.shape[1] / got.shape[1]).astype(int)
        resampled = expected[rows][:, cols]
        seen["screenshot_size"] = got.shape[:2]
        seen["png_size"] = expected.shape[:2]
        seen["mean_abs_diff"] = float(np.abs(resampled - got).mean())
        seen["screenshot_ink"] = float((got.mean(axis=2) < 0.5).mean())  # share of dark pixels: not blank
        assert seen["screenshot_ink"] > 0.005, f"the first plot's screenshot is blank (ink {seen['screenshot_ink']:.4f})"
        assert seen["mean_abs_diff"] < 0.06, (f"the first plot's screenshot differs from its PNG "
                                              f"(mean abs diff {seen['mean_abs_diff']:.3f})")
        return seen
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.report_browser", description=__doc__.split("\n\n")[0])
    parser.add_argument("html")
    parser.add_argument("--screenshot", help="where to save the first plot's screenshot (PNG)")
    args = parser.parse_args(argv)
    try:
        seen = check_report(args.html, args.screenshot)
    except (AssertionError, BrowserMissing, FileNotFoundError) as e:
        print(f"report_browser: FAILED: {e}", file=sys.stderr)
        return 1
    print(f"report_browser: {args.html}: loaded in headless Chromium, {len(seen['images'])} plot(s) decoded, "
          f"{seen['tables']} table(s), no console errors; first plot screenshot {seen['screenshot_size']} vs PNG "
          f"{seen['png_size']}: mean abs diff {seen['mean_abs_diff']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
