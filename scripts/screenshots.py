"""Screenshots of what a user sees in the MLflow UI, taken in a real headless browser.

    python scripts/screenshots.py [--out DIR] [--store DIR [--dataset NAME]] [--work DIR] [--images DIR]

Without ``--store``: builds a tiny store with the pipeline itself, as a user would (prepare,
the matrix (train and evaluate), promote ``--all`` and the report as ``python -m
pipeline.<stage>`` in ``--work``, a fresh temporary folder by default): a custom dataset of
10 classes taken from the CIFAR-10 archive named by ``$DPFAH_CIFAR10_SOURCE`` (60 images a
class), or of ``--images`` (one folder per class), or, without either, of generated colour
patches; 16 bits, methods dpfah and dsh, seeds 0 and 1 (two registered models of two
versions each), 3 epochs on the CPU (about 3 minutes here). ``--store DIR``: a folder holding
``mlflow.db`` (and the artifacts where its runs recorded them) that the pipeline wrote, e.g.
the repository after ``dvc repro``; ``--dataset`` names the experiment ``dpfah-<dataset>`` to
show (default: cifar10 with ``--store``).

Then starts a real ``mlflow server`` on that store (a free local port), and with headless
Chromium (``apt-get install -y chromium``, driven over its DevTools protocol) saves into
``--out`` (default ``screenshots/``, ignored by git) what a user sees who has closed MLflow's
Assistant side panel once (a fresh browser opens it over a third of the page) and picked
"Model training" at the top left (docs/mlflow-ui.md):

* ``1-runs-table.png``: the experiment's runs with the ``query_map`` column (Columns ->
  Metrics) and the ``champion`` tag (Columns -> Tags) added, sorted by ``query_map``;
* ``2-run.png``: the champion's training run (metrics, dataset, tags: ``champion`` among them);
* ``3-run-artifacts.png``: its ``evaluation/`` artifacts (the figures);
* ``4-logged-model.png``: the logged model, its metric search set to ``query`` (the
  evaluation's metrics, linked to it and to the dataset);
* ``5-model-version.png``: the registered model version (its description, the alias, the
  signature under Schema, opened);
* ``6-champion-runs.png``: the runs table filtered by ``tags.champion LIKE '%'``;
* ``7-model-versions.png``: the registered model's version list (alias, tags, the first
  line of each description);
* ``8-report.png``, ``9-report-grids.png``: the report run's ``report/report.html`` in its
  Artifacts tab (tables and figures), at the top and scrolled to the retrieval grids.

docs/mlflow-ui.md shows them (docs/images/mlflow-ui/, taken with this script).
A script, not a test: starting MLflow's server and a browser costs a minute. Look at the
pictures: that is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
DATASET, BITS = "toy", 16


def _stage_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    # the stages run outside the repository: tell them its commit (the runs' git_commit tag)
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        env.setdefault("DPFAH_GIT_COMMIT", commit.stdout.strip())
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    return env


def _images(work: Path, given: str | None) -> Path:
    """A class-folder dataset: ``--images``, a CIFAR-10 subset, or generated patches."""
    if given:
        return Path(given).resolve()
    out = work / "images"
    source = os.environ.get("DPFAH_CIFAR10_SOURCE")
    if source and os.path.isfile(source):
        counts: dict[str, int] = {}
        with tarfile.open(source) as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or not member.name.endswith((".jpg", ".png")) or len(parts) < 2:
                    continue
                cls = parts[-2]
                if counts.get(cls, 0) >= 60:
                    if len(counts) >= 10 and all(n >= 60 for n in counts.values()):
                        break
                    continue
                (out / cls).mkdir(parents=True, exist_ok=True)
                (out / cls / parts[-1]).write_bytes(tar.extractfile(member).read())
                counts[cls] = counts.get(cls, 0) + 1
        print(f"dataset: {sum(counts.values())} CIFAR-10 images of {len(counts)} classes from {source}")
        return out
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for _c, name in enumerate(("red", "green", "blue", "yellow")):
        colour = rng.integers(0, 256, 3)
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(40):
            pixels = np.clip(colour + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(out / name / f"{i:03d}.png")
    print("dataset: generated colour patches (set DPFAH_CIFAR10_SOURCE for real images)")
    return out


def build_store(work: Path, images: str | None) -> Path:
    """prepare, the matrix, promote --all, report: the pipeline's own commands, in ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    folder = _images(work, images)
    sets = [
        f"data.root={work / 'data'}",
        "prepare.datasets=[toy]",
        "datasets.toy.kind=custom",
        f"datasets.toy.images={folder}",
        "datasets.toy.query_per_class=6",
        "datasets.toy.train_per_class=40",
        "datasets.toy.validation=20",
        "datasets.toy.shard_size=100",
        f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}",
        f"train.storage_path={work / 'ray_results'}",
        f"bits=[{BITS}]",
        "train.methods=[dpfah,dsh]",  # two registered models, each with its champion
        "train.seeds=[0,1]",  # two versions of each: the alias on the better one
        "train.epochs=3",
        "train.batch_size=16",
        "train.image_size=32",
        "train.loader_workers=0",
        "evaluate.loader_workers=0",
        "evaluate.grid_topk=8",
        "evaluate.grid_queries=4",
    ]
    args = ["--params", str(REPO / "params.yaml"), *(a for s in sets for a in ("--set", s))]
    which = ["--dataset", DATASET]
    for stage, extra in (  # what dvc.yaml runs: the matrix trains and evaluates every entry
        ("prepare", []),
        ("matrix", []),
        ("promote", ["--all"]),
        ("report", []),
    ):
        print(f"$ python -m pipeline.{stage} {' '.join(which + extra)} ...", flush=True)
        subprocess.run(
            [PYTHON, "-m", f"pipeline.{stage}", *which, *extra, *args], cwd=work, env=_stage_env(), check=True
        )
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store: Path, timeout_s: float = 180.0):
    """A real ``mlflow server`` on ``store/mlflow.db``; yields its URL; stopped at the end."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tempfile.gettempdir()) / f"dpfah-mlflow-server-{port}.log"  # not in the store: it may be a checkout
    log = open(log_path, "w")
    server = subprocess.Popen(
        [
            str(Path(PYTHON).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=store,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"mlflow server did not start (see {log_path})") from None
                time.sleep(1)
        print(f"mlflow server at {url} (log: {log_path})")
        yield url
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install -y chromium")


#: What a user's browser remembers once they have closed MLflow's Assistant panel and picked
#: "Model training" at the top left, as docs/mlflow-ui.md says (keys of MLflow 3.17's UI:
#: its ``useLocalStorage`` hook stores ``<key>_v<version>`` as JSON). A fresh profile would
#: otherwise open the panel over the right third of every page and show the GenAI menu.
UI_STORAGE = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.workflowType_v1": '"machine_learning"',
}


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: no port, no extra package): navigate, wait for what the
    page shows, run a script in it, save a screenshot."""

    def __init__(self, width: int = 1600, height: int = 1000):
        import json
        import queue
        import threading

        self._json, self._queue = json, queue.Queue()
        self.profile = tempfile.TemporaryDirectory(prefix="chromium-")
        to_r, self._to_w = os.pipe()  # we write, Chromium reads its fd 3
        self._from_r, from_w = os.pipe()  # Chromium writes its fd 4, we read

        def child() -> None:
            import fcntl

            r, w = fcntl.fcntl(to_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [_browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}",
             "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child, close_fds=False, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_r)
        os.close(from_w)
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)  # else scripts for new documents never run
        self.size(width, height)
        seed = "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in UI_STORAGE.items())
        self.call("Page.addScriptToEvaluateOnNewDocument", session=True, source=f"try {{ {seed} }} catch (e) {{}}")

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                self._queue.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                message, buffer = buffer.split(b"\0", 1)
                self._queue.put(self._json.loads(message))

    def call(self, method: str, session: bool = False, timeout_s: float = 60.0, **params):
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        import queue

        self._next += 1
        message = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_w, self._json.dumps(message).encode() + b"\0")
        deadline = time.time() + timeout_s
        while True:
            try:
                answer = self._queue.get(timeout=max(deadline - time.time(), 0.01))
            except queue.Empty:
                raise SystemExit(f"Chromium did not answer {method} within {timeout_s:g} s") from None
            if answer is None:
                raise SystemExit(f"Chromium ended (exit {self.proc.wait()}) during {method}")
            if answer.get("id") == self._next:
                if "error" in answer:
                    raise SystemExit(f"Chromium: {method}: {answer['error'].get('message')}")
                return answer.get("result", {})

    def size(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def run(self, script: str):
        """The value of a JavaScript expression in the page (awaited when a promise)."""
        result = self.call("Runtime.evaluate", session=True, expression=script, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise SystemExit(f"script failed in the page: {result['exceptionDetails'].get('text')} ({script[:80]}...)")
        return result["result"].get("value")

    def wait_for(self, script: str, what: str, timeout_s: float = 90.0) -> None:
        """Until ``script`` is true in the page (the UI loads its data after the page)."""
        deadline = time.time() + timeout_s
        while not self.run(script):
            if time.time() > deadline:
                raise SystemExit(f"the page did not show {what} within {timeout_s:g} s")
            time.sleep(0.5)

    def open(self, url: str, shows: str, what: str, settle_s: float = 2.0) -> None:
        """Navigate and wait until the page's text contains ``shows``, then a little more
        (charts and images finish after the text)."""
        import json

        self.call("Page.navigate", session=True, url=url)
        self.wait_for(f"document.body && document.body.innerText.includes({json.dumps(shows)})", what)
        time.sleep(settle_s)

    def click(self, pattern: str, what: str) -> None:
        """Click the innermost element whose whole text matches the regular expression."""
        import json

        clicked = self.run(
            f"(() => {{ const re = new RegExp({json.dumps(pattern)});"
            " const hits = [...document.querySelectorAll('body *')].filter(e => e instanceof HTMLElement && "
            "e.offsetParent !== null && re.test((e.innerText || '').trim()));"
            " const inner = hits.filter(e => !hits.some(o => o !== e && e.contains(o)));"
            " if (!inner.length) return false; inner[0].click(); return true; })()"
        )
        if not clicked:
            raise SystemExit(f"the page has no {what} to click")

    def type_into(self, placeholder: str, text: str) -> None:
        """Type into the input with this placeholder, as a user does (React sees the keys)."""
        import json

        if not self.run(
            f"(() => {{ const e = document.querySelector('input[placeholder={json.dumps(placeholder)}]'); "
            "if (!e) return false; e.focus(); return true; })()"
        ):
            raise SystemExit(f"the page has no input {placeholder!r}")
        self.call("Input.insertText", session=True, text=text)

    def screenshot(self, path: Path) -> Path:
        import base64

        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close", timeout_s=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        self.profile.cleanup()


def take(url: str, out: Path, dataset: str = DATASET) -> list[Path]:
    import json
    from urllib.parse import quote

    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name(f"dpfah-{dataset}")
    if experiment is None:
        raise SystemExit(f"{url}: no experiment dpfah-{dataset} in this store (--dataset names it)")
    runs = client.search_runs([experiment.experiment_id], "tags.champion LIKE '%'", max_results=100)
    runs = sorted(runs, key=lambda r: not r.data.tags["champion"].startswith("dpfah-"))  # DPFAH's champion first
    runs = (
        runs
        or client.search_runs([experiment.experiment_id], "tags.`promote.version` != ''", max_results=100)
        or [
            r
            for r in client.search_runs([experiment.experiment_id], max_results=100)
            if r.outputs and r.outputs.model_outputs
        ]
    )  # the promoted trainings, else any with a logged model
    if not runs:
        raise SystemExit(f"{url}: experiment dpfah-{dataset} has no training run with a logged model")
    run = runs[0]  # the champion's training (DPFAH's), else the latest promoted training, if any
    reports = client.search_runs([experiment.experiment_id], "tags.kind = 'report'", max_results=1)
    model = client.get_logged_model(run.outputs.model_outputs[0].model_id)
    name = run.data.tags.get("promote.model_name", model.name)
    version = run.data.tags.get("promote.version", "1")
    exp, run_id, run_name = experiment.experiment_id, run.info.run_id, run.info.run_name
    out.mkdir(parents=True, exist_ok=True)
    browser = Browser()
    shots = []

    def shot(file: str, height: int = 1000) -> None:
        browser.size(1600, height)
        time.sleep(1)
        shots.append(browser.screenshot(out / file))
        print(f"wrote {out / file}")

    try:
        # The runs table as docs/mlflow-ui.md has a user set it up: the query_map column
        # (Columns -> Metrics), sorted by it, best first. The UI keeps the columns it shows
        # in the browser's storage; the script adds the column there, as the Columns menu does.
        table = f"{url}/#/experiments/{exp}/runs?orderByKey={quote('metrics.`query_map`')}&orderByAsc=false"
        browser.open(table, run_name, "the runs table")
        key = browser.run(
            "Object.keys(localStorage).find(k => k.includes('ExperimentPage') && k.endsWith('ReactComponentState')) "
            "|| null"
        )
        if key is None:
            raise SystemExit(
                "the MLflow UI kept no runs-table state: this script knows MLflow 3.17's UI (docs/mlflow-ui.md says "
                "how to add the column by hand)"
            )
        columns = json.dumps(["metrics.`query_map`", "tags.`champion`"])  # Columns -> Metrics, Columns -> Tags
        browser.run(
            f"(() => {{ const k = {json.dumps(key)}, s = JSON.parse(localStorage.getItem(k));"
            f" for (const c of {columns}) if (!s.selectedColumns.includes(c)) s.selectedColumns.push(c);"
            f" localStorage.setItem(k, JSON.stringify(s)); return true; }})()"
        )
        browser.call("Page.reload", session=True)
        time.sleep(1)
        browser.wait_for(
            "[...document.querySelectorAll('[role=columnheader], .ag-header-cell')].some(h => "
            "h.innerText.includes('query_map'))"
            f" && document.body.innerText.includes({json.dumps(run_name)})",
            "the query_map column",
        )
        time.sleep(2)
        shot("1-runs-table.png", 600)
        # Which run holds the champion: the search box's filter, as docs/mlflow-ui.md says.
        champions = "tags.champion LIKE '%'"
        browser.open(f"{table}&searchFilter={quote(champions)}", run_name, "the runs holding a champion")
        browser.wait_for(
            "[...document.querySelectorAll('[role=row], .ag-row')].filter(r => r.innerText.includes('-s')).length "
            f"<= {len(runs)}",
            "the filtered runs table",
        )
        time.sleep(2)
        shot("6-champion-runs.png", 400)
        browser.open(f"{url}/#/experiments/{exp}/runs/{run_id}", "Metrics", "the run's page")
        shot("2-run.png", 1300)
        browser.open(
            f"{url}/#/experiments/{exp}/runs/{run_id}/artifacts/evaluation/pr_curves.png",
            "pr_curves.png",
            "the run's artifacts",
            settle_s=4,
        )
        shot("3-run-artifacts.png")
        # The logged model: its metrics filtered to the evaluation's (linked to it and to the
        # dataset), as a user types "query" into the page's metric search.
        browser.open(f"{url}/#/experiments/{exp}/models/{model.model_id}", "Datasets used", "the logged model")
        browser.wait_for(
            "!!document.querySelector('input[placeholder=\"Search metrics\"]')", "the logged model's metric search"
        )
        browser.type_into("Search metrics", "query")
        time.sleep(2)
        shot("4-logged-model.png", 1300)
        # The registered version: its description, alias and the signature (Schema, opened).
        browser.open(f"{url}/#/models/{quote(name)}/versions/{version}", "Description", "the model version")
        browser.click(r"^Inputs \(\d+\)$", "Schema -> Inputs")
        browser.click(r"^Outputs \(\d+\)$", "Schema -> Outputs")
        time.sleep(1)
        shot("5-model-version.png", 1300)
        # The registered model's versions: the alias and each description's first line.
        browser.open(f"{url}/#/models/{quote(name)}", "Version", "the registered model's versions")
        browser.wait_for(
            f"document.body.innerText.includes({json.dumps(model_description(client, name, version))})",
            "the versions' descriptions",
        )
        shot("7-model-versions.png", 1000)
        # The report run's report.html (its figures embedded) in the Artifacts tab.
        if reports:
            report = reports[0].info.run_id
            browser.open(
                f"{url}/#/experiments/{exp}/runs/{report}/artifacts/report/report.html",
                "report.html",
                "the report run's artifacts",
                settle_s=5,
            )
            shot("8-report.png", 1300)
            # Further down the same page: the retrieval grids. The page is in a sandboxed
            # iframe (no script reaches into it), so a mouse wheel scrolls it, by as much as
            # the grids' heading lies down the page at the iframe's width.
            frame = browser.run(
                "(() => { const r = document.querySelector('iframe').getBoundingClientRect();"
                " return [r.x, r.y, r.width, r.height]; })()"
            )
            with tempfile.TemporaryDirectory(prefix="dpfah-report-") as tmp:
                page = client.download_artifacts(report, "report/report.html", tmp)
                browser.size(int(frame[2]), int(frame[3]))
                browser.open(Path(page).as_uri(), "Retrieval grids", "the report alone")
                down = browser.run(
                    "(() => { const h = [...document.querySelectorAll('p')].find(e =>"
                    " e.innerText.startsWith('Retrieval grids')); return h.getBoundingClientRect().top - 16; })()"
                )
            browser.size(1600, 1100)
            browser.open(
                f"{url}/#/experiments/{exp}/runs/{report}/artifacts/report/report.html",
                "report.html",
                "the report run's artifacts",
                settle_s=5,
            )
            x, y = frame[0] + frame[2] / 2, frame[1] + min(frame[3], 800) / 2
            browser.call("Input.dispatchMouseEvent", session=True, type="mouseWheel", x=x, y=y, deltaX=0, deltaY=down)
            time.sleep(2)
            shot("9-report-grids.png", 880)
        else:
            print(f"no report run in dpfah-{dataset}: no 8-report.png (python -m pipeline.report --dataset {dataset})")
    finally:
        browser.close()
    return shots


def model_description(client, name: str, version: str) -> str:
    """The start of a version's description: its row in the version list shows the first 32
    characters or so of the first line, then "..." (MLflow 3.17)."""
    return (client.get_model_version(name, version).description or "").splitlines()[0][:20]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/screenshots.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="screenshots", help="folder for the PNGs (default: screenshots/)")
    parser.add_argument("--store", help="a folder with the pipeline's mlflow.db (default: build one in --work)")
    parser.add_argument("--dataset", help="with --store: the experiment dpfah-<dataset> to show (default: cifar10)")
    parser.add_argument("--work", help="where to build the tiny store (default: a new temporary folder, kept)")
    parser.add_argument(
        "--images", help="a class-folder dataset for the tiny store (default: a CIFAR-10 subset or colour patches)"
    )
    args = parser.parse_args(argv)
    _browser()  # fail before any work
    store = (
        Path(args.store).resolve()
        if args.store
        else build_store(Path(args.work or tempfile.mkdtemp(prefix="dpfah-ui-")).resolve(), args.images)
    )
    with mlflow_server(store) as url:
        shots = take(url, Path(args.out).resolve(), args.dataset or ("cifar10" if args.store else DATASET))
    print(f"{len(shots)} screenshots in {Path(args.out).resolve()}; the store is {store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
