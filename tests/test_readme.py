"""The README runs as written: every code block is extracted and run on a fresh folder.

The toy base stands in for Stable Diffusion 1.5 (no real weights here) and a local test Hub for the Hub
(patches named in the snippet are put there first). ``pip install`` and the test command itself are not run
again, and a command that appears twice runs once. Commands marked ``slow`` in the README, and those in
:data:`LONG` (a minute or more each here; their own tests cover them with smaller settings), run only with
``FORGETPATCH_README_ALL=1``, and so does any command that uses what a skipped one writes.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import time
from pathlib import Path

import huggingface_hub
import pytest
from typer.testing import CliRunner

import forgetpatch
from forgetpatch.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
RUN_ALL = os.environ.get("FORGETPATCH_README_ALL", "") not in ("", "0")
TOKEN = "hf_readme_token"
SD15 = 'StableDiffusionPipeline.from_pretrained("runwayml/stable-diffusion-v1-5")'
#: Verbs whose README command takes a minute or more on CI's 2 cores (test_eval_toy and test_attack run them small).
LONG = ("demo", "eval", "attack")


def _commands() -> list[tuple[str, bool]]:
    """Every command line of the README's shell blocks, with whether it is marked slow."""
    lines = []
    for language, body in BLOCKS:
        if language != "bash":
            continue
        for line in body.splitlines():
            for command in line.split(" && "):
                command = command.strip()
                words = shlex.split(command, comments=True)
                if command.startswith("forgetpatch"):
                    if words not in [shlex.split(c, comments=True) for c, _ in lines]:
                        lines.append((command, bool(re.search(r"#.*\bslow\b", command)) or words[1] in LONG))
                else:
                    assert command.startswith(("pip install", "python -m pytest", "#")) or not command, command
    return lines


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A fresh working folder beside the checkout's recipes and benchmarks, and a local test Hub."""
    from hub_server import HubServer

    for name in ("recipes", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FORGETPATCH_CACHE", str(tmp_path / "cache"))
    with HubServer(token=TOKEN, lifetime=3600 if RUN_ALL else 600) as server:  # it stops itself after that
        for name, value in {"HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": server.endpoint,
                            "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
            monkeypatch.setenv(name, value)
        importlib.reload(huggingface_hub.constants)
        yield tmp_path
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def test_the_readme_has_the_blocks_this_test_runs():
    assert [language for language, _ in BLOCKS].count("python") == 1
    assert SD15 in BLOCKS[0][1]
    assert len(_commands()) >= 10


def test_python_snippet_runs_as_written(world):
    """The opening snippet, on the toy base, with the Hub patches it names published first."""
    toy = forgetpatch.toy.pipeline()
    for repo, shape in (("org/no-vangogh", "square"), ("org/no-nudity", "triangle"), ("org/no-cat", "hexagon")):
        patch = forgetpatch.erase(toy, [shape], method="uce", progress=False)
        forgetpatch.push(patch.save(world / "published" / repo.split("/")[1]), repo)
    code = BLOCKS[0][1].replace(SD15, "forgetpatch.toy.pipeline()")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    pipe = namespace["pipe"]
    assert forgetpatch.applied(pipe) == []  # the snippet ends with everything taken off
    assert (world / "no-circle-star" / "forgetpatch.json").is_file()
    assert forgetpatch.load("org/no-circle-star").name == namespace["patch"].name  # pushed and pulled back


def test_commands_run_as_written(world):
    runner = CliRunner()
    skipped: list[str] = []
    ran = []
    for line, slow in _commands():
        words = shlex.split(line, comments=True)[1:]
        writes = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-o", "--output")]
        if (slow and not RUN_ALL) or any(w.rstrip("/") in skipped for w in words):
            skipped += [w.rstrip("/") for w in writes]
            continue
        start = time.perf_counter()
        result = runner.invoke(app, words)
        assert result.exit_code == 0, f"{line}\n{result.output}\n{result.exception!r}"
        assert "Traceback" not in result.output, line
        ran.append(words[0])
        print(f"{time.perf_counter() - start:6.1f} s  {line}")
    assert {"erase", "inspect", "apply", "push", "export", "toy", "bench"} <= set(ran)
    assert not RUN_ALL or set(LONG) | {"keysteps", "chain"} <= set(ran)
    assert (world / "no-circle-star.safetensors").is_file() and (world / "out.png").is_file()
    assert forgetpatch.load("org/no-circle-star").name == forgetpatch.load("no-circle-star").name  # pushed
