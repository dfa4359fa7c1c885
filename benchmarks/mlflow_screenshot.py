"""The MLflow UI's compare view of a store's finished training runs, as a PNG (the README's picture),
seen in Debian's headless Chromium (`make setup` installs chromium and chromium-driver).

    uv run python benchmarks/mlflow_screenshot.py --store . --out docs/mlflow_compare.png

`--store DIR` is the directory whose `mlflow.db` the runs logged to (MLflow's default store, where
`distswitch train` was launched). tests/test_browser.py drives the UI with the same helpers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def serve(store: Path, timeout: float = 180):
    """`make ui STORE=store` on a free loopback port; yields its URL once the server answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(store) / "ui.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            ["make", "--no-print-directory", "ui", f"STORE={Path(store).resolve()}", f"PORT={port}"],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"make ui exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"make ui: no answer in {timeout:.0f} s: {log.read_text()[-2000:]}") from None
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextmanager
def chromium(width: int = 1600, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    if not driver_path:
        raise RuntimeError("chromedriver is missing: `make setup` installs Debian's chromium and chromium-driver")
    options = Options()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(browser, *texts: str, timeout: float = 60) -> str:
    """The page's visible text once every one of `texts` shows (the UI renders after loading)."""
    deadline, body = time.time() + timeout, ""
    while time.time() < deadline:
        body = browser.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"{browser.current_url}: missing {[t for t in texts if t not in body]} in: {body[:3000]}")


def wait_for_plot(browser, timeout: float = 60) -> None:
    """Until the page's first plotly chart has drawn its traces."""
    deadline = time.time() + timeout
    while not browser.find_elements("css selector", ".js-plotly-plot .main-svg"):
        if time.time() > deadline:
            raise AssertionError(f"{browser.current_url}: no plot drawn in {timeout:.0f} s")
        time.sleep(0.5)


def compare_view(ui: str, experiment_id: str, run_ids: list[str]) -> str:
    ids = ",".join(f'"{r}"' for r in run_ids)
    return f'{ui}/#/compare-runs?runs=[{ids}]&experiments=["{experiment_id}"]'


def main(argv: list[str] | None = None) -> None:
    from mlflow.tracking import MlflowClient

    from distswitch.compare import COMPARE_TAG

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="the directory holding mlflow.db")
    parser.add_argument("--experiment", help="experiment name (default: the one with the most finished runs)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    client = MlflowClient(f"sqlite:///{Path(args.store).resolve() / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if args.experiment in (None, e.name)]
    runs = {
        e.experiment_id: [
            r.info.run_id
            for r in client.search_runs([e.experiment_id], "attributes.status = 'FINISHED'")
            if not r.data.tags.get(COMPARE_TAG)
        ]
        for e in experiments
    }
    experiment = max(runs, key=lambda e: len(runs[e]))
    with serve(Path(args.store)) as ui, chromium() as browser:
        browser.get(compare_view(ui, experiment, runs[experiment]))
        wait_for_text(browser, f"Comparing {len(runs[experiment])} Runs")
        wait_for_plot(browser)
        for button in browser.find_elements("css selector", "button[aria-label*='lose']"):  # the assistant's panel
            if button.is_displayed():
                button.click()
        time.sleep(2)  # the plot redraws to the freed width
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(args.out)
    print(f"{args.out}: the compare view of {len(runs[experiment])} runs")


if __name__ == "__main__":
    main()
