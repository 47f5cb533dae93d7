"""A real ComfyUI server on loopback with this pack, and Debian's Chromium driven by Playwright.

``scripts/install_browser.sh`` installs both. One server and one browser per session; each test
gets the page with an empty graph in the renderer it asks for. Screenshots go to
``.cache/browser-artifacts/`` (git-ignored), the server log too.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lora_workbench.headless import comfy_env

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / ".cache" / "browser-artifacts"
CHROMIUM = os.environ.get("LORA_WORKBENCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The frontend's own console noise: optional files a fresh install does not have (404s), and its
# look-ups of node packs on api.comfy.org, which the server's Content-Security-Policy blocks (so no
# request leaves the machine). Frontend 1.49 also logs "graph accessed before initialization" on
# every page load: its app-mode store reads `app.rootGraph` before the graph exists (the pack's js
# never reads `rootGraph`).
HARMLESS_CONSOLE = (
    "user.css",
    "comfy.templates.json",
    "Failed to load resource",
    "favicon",
    "https://api.comfy.org/",
    "ComfyApp graph accessed before initialization",
)
# Frontend 1.32's render-mode setting handler reads the definition of a setting not yet registered
# while the page loads (useRenderModeSetting -> settingStore onChange: `setting.id` of undefined).
HARMLESS_PAGE_LOAD_ERROR = ("Cannot read properties of undefined (reading 'id')", "useRenderModeSetting", "GraphView")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (loopback only)
        return r.read()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    """A ComfyUI base directory: this pack in custom_nodes, the tiny checkpoint, three LoRAs."""
    base = tmp_path_factory.mktemp("browser_comfy")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("make_fixtures.py")), str(base)],
        check=True,
        capture_output=True,
        text=True,
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    (base / "fixtures.json").write_text(json.dumps(info))
    return base


@pytest.fixture(scope="session")
def fixtures_info(comfy_base) -> dict:
    return json.loads((comfy_base / "fixtures.json").read_text())


@pytest.fixture(scope="session")
def server(comfy_base, artifacts):
    """The URL of a ComfyUI server started from the pinned tree with ``--cpu`` on a free loopback port."""
    comfy = comfy_env.comfyui_path()
    main = comfy / "main.py"
    if not main.is_file():
        raise FileNotFoundError(f"No ComfyUI at {comfy}: run scripts/setup.sh")
    port = _free_port()
    log_path = artifacts / "server.log"
    log = open(log_path, "w")
    cmd = [
        sys.executable,
        str(main),
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(comfy_base),
        "--disable-api-nodes",
        "--database-url",
        "sqlite:///:memory:",
        "--preview-method",
        "none",
    ]
    proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}; log: {log_path}")
            try:
                info = json.loads(_get(f"{url}/object_info/LoraWorkbenchStack"))
                if "LoraWorkbenchStack" not in info:
                    raise RuntimeError(f"ComfyUI did not load LoRA Workbench; log: {log_path}")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ComfyUI did not answer on {url} within 180 s; log: {log_path}") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def node_types(server) -> set[str]:
    """Node ids the server offers."""
    return set(json.loads(_get(f"{server}/object_info", timeout=30)))


@pytest.fixture(scope="session")
def browser_context():
    """A persistent Chromium context on a fresh profile folder."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: run scripts/install_browser.sh")
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="lw-chromium-")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


# What the tests' graph-building scripts share, on every page as ``lwTest``: ``add(type, x, y)`` makes a node,
# ``link(a, output, b, input)`` connects an output (by name or type) to an input (by name), ``w(node, name)``
# finds a widget. They read ``LiteGraph`` and ``app`` when called, after the page has loaded them.
GRAPH_HELPERS = """
window.lwTest = {
  add(type, x, y) { const n = LiteGraph.createNode(type); n.pos = [x, y]; app.graph.add(n); return n; },
  link(a, out, b, inp) {
    const o = a.outputs.findIndex(s => s.name === out || s.type === out);
    const i = b.inputs.findIndex(s => s.name === inp);
    if (o < 0 || i < 0) throw new Error(`no slot ${out} -> ${inp}`);
    a.connect(o, b, i);
  },
  w(n, name) { return n.widgets.find(w => w.name === name); },
};
"""


class ComfyPage:
    """The ComfyUI page and the helpers the tests share."""

    def __init__(self, page, url: str, artifacts: Path):
        self.page = page
        self.url = url
        self.artifacts = artifacts
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def _on_console(self, msg) -> None:
        text = msg.text
        if msg.type != "error" or any(h in text for h in HARMLESS_CONSOLE):
            return
        if HARMLESS_PAGE_LOAD_ERROR[0] in text and "at onChange" in text and HARMLESS_PAGE_LOAD_ERROR[2] in text:
            return
        self.console_errors.append(text)

    def open(self) -> None:
        page = self.page
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        page.add_init_script(GRAPH_HELPERS)
        page.goto(self.url)
        self.wait_loaded()

    def wait_loaded(self) -> None:
        """Wait until the page (after a load or reload) has our extensions and has opened its workflow.

        After a reload the frontend reopens the last active workflow tab by itself; frontend 1.49 does
        that a moment after the graph and the extensions exist, and a graph loaded before then is
        replaced by it. The workflow store's active workflow is set once that is done (1.32 and 1.49).
        """
        page = self.page
        page.wait_for_function("() => window.app && window.app.graph && document.querySelector('#graph-canvas')")
        page.wait_for_function(
            "() => window.app.extensions && window.app.extensions.some(e => e.name === 'LoraWorkbench.Stack')"
        )
        page.wait_for_function("() => window.app.extensionManager?.workflow?.activeWorkflow?.isLoaded")

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def set_renderer(self, vue: bool) -> None:
        self.js(
            "async (on) => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on); }",
            vue,
        )
        self.page.wait_for_timeout(300)

    def clear(self) -> None:
        """Empty the graph and put the view back at scale 1, origin in the corner (tests move it)."""
        self.js(
            "() => { app.graph.clear(); app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];"
            " app.canvas.setDirty(true, true); }"
        )

    def last_prompt(self) -> dict:
        """The server's history entry of the last prompt, once the queue is empty.

        The page hears "executed" and our done event while the prompt still runs; the server writes
        the history entry only when the whole prompt has ended, so read it once nothing is queued.
        """
        idle = (
            "async () => { const q = await (await fetch('/queue')).json();"
            " return q.queue_running.length + q.queue_pending.length === 0; }"
        )
        deadline = time.monotonic() + 60
        while not self.js(idle):
            assert time.monotonic() < deadline, "the queue is still busy after 60 s"
            self.page.wait_for_timeout(100)
        history = self.js("async () => (await fetch('/history?max_items=1')).json()")
        (entry,) = history.values()
        return entry

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def our_errors(self) -> list[str]:
        """Uncaught page errors, and console errors that are not the frontend's known noise."""
        return self.page_errors + self.console_errors


@pytest.fixture(scope="session")
def comfy_page(browser_context, server, artifacts):
    page = browser_context.new_page()
    browser_context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server)
    cp = ComfyPage(page, server, artifacts)
    cp.open()
    yield cp
    page.close()


@pytest.fixture(params=["classic", "vue"])
def renderer(request) -> str:
    return request.param


@pytest.fixture
def ui(comfy_page, request):
    """The page with an empty graph, in the renderer a ``renderer`` parameter names (classic by default)."""
    vue = request.node.callspec.params.get("renderer") == "vue" if hasattr(request.node, "callspec") else False
    comfy_page.set_renderer(vue)
    comfy_page.clear()
    comfy_page.console_errors.clear()
    comfy_page.page_errors.clear()
    yield comfy_page
    comfy_page.screenshot(request.node.name.replace("/", "_").replace("[", "-").replace("]", ""))
