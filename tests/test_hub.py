"""forgetpatch.hub without the internet: the real huggingface_hub client, against a hand-built cache
(offline) or the in-memory Hub of ``hub_server.py`` over HTTP on 127.0.0.1 (online)."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from hub_server import HubServer, git_blob_oid
from typer.testing import CliRunner

import forgetpatch
from forgetpatch.errors import HubError, IntegrityError
from forgetpatch.format import MANIFEST_NAME, WEIGHTS_NAME, Patch, build_patch, read_patch
from forgetpatch.hub import download, push, render_card
from forgetpatch.testing import tiny_sd_pipeline

ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
MODULES = {
    f"{ATTN}.to_k": (32, 32),
    f"{ATTN}.to_v": (32, 32),
    "unet.down_blocks.0.resnets.0.conv1": (32, 288),
}
TOKEN = "hf_test_token"


def make_patch(pipe, name: str = "no-vangogh", seed: int = 0, rank: int = 2, **manifest) -> Patch:
    """A small random patch on the tiny pipeline (two attn2 linears and a 3x3 conv)."""
    g = torch.Generator().manual_seed(seed)
    factors = {
        path: (torch.randn(rank, n_in, generator=g) * 0.1, torch.randn(n_out, rank, generator=g) * 0.1)
        for path, (n_out, n_in) in MODULES.items()
    }
    manifest.setdefault("lineage", [])
    manifest.setdefault("base_model_id", "org/tiny-sd")
    return build_patch(pipe, factors, name=name, method="uce", concepts=["vangogh"], **manifest)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Configure huggingface_hub through its environment variables, as a user would, on a fresh HF_HOME.

    ``huggingface_hub.constants`` reads the environment at import, so it is reloaded after each
    change (``configure(**env)``) and once more after the test, with the environment restored.
    """
    for name in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")

    def configure(**env: str | None) -> None:
        for name, value in env.items():
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        importlib.reload(huggingface_hub.constants)

    configure()
    yield configure
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


@pytest.fixture(params=["lfs"])
def hub(request, hf_env):
    """The test Hub on 127.0.0.1, with HF_ENDPOINT and HF_TOKEN pointing at it.

    Binary files go through Git LFS as on the Hub (``param="lfs"``) or as regular base64 commit
    lines (``"regular"``); Xet, which the test Hub does not speak, is switched off.
    """
    with HubServer(token=TOKEN, lfs=request.param == "lfs", lifetime=120) as server:
        hf_env(HF_ENDPOINT=server.endpoint, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1")
        yield server


def _saved(patch: Patch, folder: Path, extra: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return patch.save(folder)


def _weight(pipe, module_path: str) -> torch.Tensor:
    module = pipe.unet.get_submodule(module_path.removeprefix("unet."))
    return module.weight.detach().clone()


# --- offline: a hand-built cache, resolved by the real client ---------------------------------
def _build_cache(cache: Path, repo_id: str, folder: Path, refs: list[str]) -> str:
    """Lay ``folder`` out as huggingface_hub does: blobs named by ETag, snapshot symlinks, refs."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        etag = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else git_blob_oid(data)
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return commit


def test_offline_resolves_hand_built_cache(pipe, tmp_path, hf_env):
    patch = make_patch(pipe)
    folder = _saved(patch, tmp_path / "patch")
    hf_env(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there; nothing is asked
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    assert cache == tmp_path / "hf_home" / "hub"  # HF_HOME is respected
    commit = _build_cache(cache, "org/no-vangogh", folder, refs=["main", "v1"])

    for ref, revision in [("org/no-vangogh", None), ("org/no-vangogh@v1", None), ("org/no-vangogh", commit)]:
        snapshot = download(ref, revision=revision)
        assert snapshot == cache / "models--org--no-vangogh" / "snapshots" / commit
        assert read_patch(snapshot).digest == patch.digest

    # by repo id through the loader, still offline
    assert forgetpatch.load("org/no-vangogh@v1").digest == patch.digest


def test_offline_in_a_fresh_process_configured_by_environment(pipe, tmp_path):
    """What a user does: HF_HOME + HF_HUB_OFFLINE=1 set before Python starts (no reloading)."""
    folder = _saved(make_patch(pipe), tmp_path / "patch")
    home = tmp_path / "home"
    commit = _build_cache(home / "hub", "org/no-vangogh", folder, refs=["v1"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    script = (
        "from forgetpatch.hub import download\n"
        "print(download('org/no-vangogh@v1'))\n"
        "try:\n    download('org/no-vangogh')\n"  # refs/main was never cached
        "except Exception as exc:\n    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    snapshot, error = out.stdout.strip().splitlines()
    assert snapshot == str(home / "hub" / "models--org--no-vangogh" / "snapshots" / commit)
    assert error.startswith(
        "HubError Hub repo org/no-vangogh (file 'forgetpatch.json') is not in the local Hub cache"
    )


def test_offline_not_cached_is_a_clear_error(pipe, tmp_path, hf_env):
    folder = _saved(make_patch(pipe), tmp_path / "patch")
    hf_env(HF_HUB_OFFLINE="1")
    _build_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), "org/cached", folder, refs=["main"])
    with pytest.raises(HubError, match=r"org/absent.*not in the local Hub cache.*HF_HUB_OFFLINE"):
        download("org/absent")
    with pytest.raises(HubError, match=r"org/cached@v2.*not in the local Hub cache"):
        download("org/cached", revision="v2")


def test_offline_corrupted_cache_refused(pipe, tmp_path, hf_env):
    folder = _saved(make_patch(pipe), tmp_path / "patch")
    hf_env(HF_HUB_OFFLINE="1")
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    commit = _build_cache(cache, "org/rotten", folder, refs=["main"])
    weights = (cache / "models--org--rotten" / "snapshots" / commit / WEIGHTS_NAME).resolve()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=WEIGHTS_NAME) as info:
        download("org/rotten")
    assert f"delete {cache / 'models--org--rotten'} and load again online" in str(info.value)  # the way out


# --- online: the real client over HTTP against the test Hub ------------------------------------
@pytest.mark.parametrize("hub", ["lfs", "regular"], indirect=True)
def test_push_then_apply_by_repo_id(pipe, tmp_path, hub):
    patch = make_patch(pipe, metrics={"forget": {"acc": 0.02}})
    grid = b"\x89PNG\r\n\x1a\nnot-really-a-png"
    folder = _saved(patch, tmp_path / "no-vangogh", extra={"grid.png": grid, "README.md": b"# my notes\n"})

    url = push(folder, "org/no-vangogh", commit_message="first version")
    assert url == f"{hub.endpoint}/org/no-vangogh"

    # one commit, with the patch files and a generated card replacing the folder's README.md
    commits = [p for m, p in hub.state.requests if m == "POST" and p.endswith("/commit/main")]
    assert commits == ["/api/models/org/no-vangogh/commit/main"]
    repo = hub.state.repos["org/no-vangogh"]
    head = repo.commits[repo.branches["main"]]
    assert head.message == "first version"
    assert set(head.files) == {".gitattributes", "README.md", MANIFEST_NAME, WEIGHTS_NAME, "grid.png"}
    uploads = [p for m, p in hub.state.requests if m == "PUT"]  # weights and grid through Git LFS, or inline
    assert len(uploads) == (2 if hub.lfs else 0)
    card = head.files["README.md"].decode()
    assert "# no-vangogh" in card and "![Before and after the patch](grid.png)" in card

    before = {m: _weight(pipe, m) for m in MODULES}
    forgetpatch.apply(pipe, "org/no-vangogh", fuse=True)
    try:
        [entry] = forgetpatch.applied(pipe)
        assert entry.patch.digest == patch.digest
        for module in MODULES:
            change = _weight(pipe, module) - before[module]
            torch.testing.assert_close(change, patch.delta(module), rtol=1e-4, atol=1e-6)
    finally:
        forgetpatch.remove(pipe)
    for module in MODULES:
        assert torch.equal(_weight(pipe, module), before[module])

    # the files came through the Hub cache under HF_HOME, the weights by name through the "CDN"
    snapshot = download("org/no-vangogh")
    assert snapshot.is_relative_to(Path(huggingface_hub.constants.HF_HUB_CACHE))
    assert (snapshot / "grid.png").read_bytes() == grid
    assert ("HEAD", f"/org/no-vangogh/resolve/main/{MANIFEST_NAME}") in hub.state.requests
    assert any(m == "GET" and p.startswith("/blobs/") for m, p in hub.state.requests)


def test_downloaded_patch_is_available_offline(pipe, hub, hf_env):
    patch = make_patch(pipe)
    push(patch, "org/travel")
    online = download("org/travel@main")
    hf_env(HF_HUB_OFFLINE="1")
    seen = len(hub.state.requests)
    assert download("org/travel") == online
    assert forgetpatch.load("org/travel").digest == patch.digest
    assert len(hub.state.requests) == seen  # served from the cache alone


def test_manifest_listing_files_outside_the_patch_is_refused(pipe, hub):
    from huggingface_hub import HfApi

    push(make_patch(pipe), "org/escape")
    manifest = json.loads(hub.file("org/escape", MANIFEST_NAME))
    manifest["files"]["../../outside.txt"] = "0" * 64
    HfApi().upload_file(
        path_or_fileobj=json.dumps(manifest).encode(), path_in_repo=MANIFEST_NAME, repo_id="org/escape"
    )
    with pytest.raises(IntegrityError, match="outside the patch"):
        download("org/escape")


def test_revision_pins_branch_tag_and_commit(pipe, tmp_path, hub):
    from huggingface_hub import HfApi

    v1, v2, dev = (make_patch(pipe, name=n, seed=s) for n, s in [("v1", 1), ("v2", 2), ("dev", 3)])
    push(v1, "org/pinned")
    api = HfApi()
    first = api.model_info("org/pinned").sha
    api.create_tag("org/pinned", tag="v1.0")
    push(v2, "org/pinned")
    assert push(dev, "org/pinned", revision="dev") == f"{hub.endpoint}/org/pinned/tree/dev"

    names = {
        ref: read_patch(download(ref)).name
        for ref in ["org/pinned", "org/pinned@v1.0", f"org/pinned@{first}", "org/pinned@dev"]
    }
    assert names == {
        "org/pinned": "v2",
        "org/pinned@v1.0": "v1",
        f"org/pinned@{first}": "v1",
        "org/pinned@dev": "dev",
    }
    assert forgetpatch.load("org/pinned@v1.0").digest == v1.digest
    assert download("org/pinned", revision="dev").name == api.model_info("org/pinned", revision="dev").sha


def test_tampered_file_refused_and_nothing_applied(pipe, tmp_path, hub):
    patch = make_patch(pipe)
    push(patch, "org/tampered")
    weights = bytearray(hub.file("org/tampered", WEIGHTS_NAME))
    weights[-1] ^= 0xFF
    hub.tamper("org/tampered", WEIGHTS_NAME, bytes(weights))

    with pytest.raises(IntegrityError, match=rf"{WEIGHTS_NAME}.*sha256"):
        download("org/tampered")
    before = {m: _weight(pipe, m) for m in MODULES}
    with pytest.raises(IntegrityError):
        forgetpatch.apply(pipe, "org/tampered", fuse=True)
    assert forgetpatch.applied(pipe) == []
    assert all(torch.equal(_weight(pipe, m), before[m]) for m in MODULES)


def test_card_edited_on_the_hub_keeps_the_patch_verifiable(pipe, hub):
    patch = make_patch(pipe)
    push(patch, "org/edited")
    hub.tamper("org/edited", "README.md", b"---\nlicense: mit\n---\nEdited on the website.\n")
    assert read_patch(download("org/edited")).digest == patch.digest


def test_missing_repo_revision_and_file_are_clear_errors(pipe, hub):
    with pytest.raises(HubError, match=r"repo org/nowhere was not found"):
        download("org/nowhere")
    push(make_patch(pipe), "org/real")
    with pytest.raises(HubError, match=r"org/real has no revision 'v9'"):
        download("org/real@v9")
    # a repo that is not a patch (a plain LoRA repo without forgetpatch.json)
    from huggingface_hub import HfApi

    HfApi().create_repo("org/plain-lora")
    with pytest.raises(HubError, match=rf"org/plain-lora has no file '{MANIFEST_NAME}'"):
        download("org/plain-lora")
    # a patch repo whose weights were deleted
    HfApi().delete_file(WEIGHTS_NAME, "org/real")
    with pytest.raises(HubError, match=rf"has no file '{WEIGHTS_NAME}'"):
        forgetpatch.load("org/real")


def test_private_repo_needs_the_token(pipe, hub, hf_env):
    patch = make_patch(pipe)
    push(patch, "org/secret", private=True)
    assert hub.state.repos["org/secret"].private
    hf_env(HF_TOKEN=None)
    with pytest.raises(HubError, match=r"org/secret was not found.*HF_TOKEN"):
        download("org/secret")
    assert read_patch(download("org/secret", token=TOKEN)).digest == patch.digest
    with pytest.raises(HubError, match=r"HTTP 401.*write access"):
        push(patch, "org/other")


def test_repush_unchanged_patch_adds_no_commit(pipe, tmp_path, hub):
    folder = _saved(make_patch(pipe), tmp_path / "p")
    push(folder, "org/same")
    head = hub.state.repos["org/same"].branches["main"]
    push(folder, "org/same")
    assert hub.state.repos["org/same"].branches["main"] == head


def test_cli_push(pipe, tmp_path, hub):
    from forgetpatch.cli import app

    folder = _saved(make_patch(pipe), tmp_path / "p")
    result = CliRunner().invoke(app, ["push", str(folder), "org/from-cli", "--revision", "exp", "-m", "cli"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{hub.endpoint}/org/from-cli/tree/exp"
    assert hub.state.repos["org/from-cli"].branches.keys() == {"main", "exp"}

    result = CliRunner().invoke(app, ["push", str(tmp_path / "nope"), "org/from-cli"])
    assert result.exit_code == 1 and "not a patch folder" in result.output


# --- the model card ----------------------------------------------------------------------------
def test_model_card(pipe, tmp_path):
    key_steps = [{"start": 0.1, "end": 0.5, "timesteps": [901, 801, 701], "concept": "vangogh"}]
    patch = make_patch(
        pipe,
        preserved=["monet"],
        key_steps=key_steps,
        params={"lam": 0.5, "preserve_scale": 1.0},
        metrics={"forget": {"acc": 0.0312}, "retain_acc": 0.97},
        lineage=["ab" * 32],
    )
    folder = _saved(patch, tmp_path / "no-vangogh", extra={"before_after.png": b"png"})
    card = render_card(folder, "org/no-vangogh")

    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-sd"
    assert data["base_model_relation"] == "adapter"
    assert data["library_name"] == "diffusers"
    assert data["license"] == "other"
    assert data["tags"] == ["forgetpatch", "concept-unlearning", "lora", "text-to-image", "diffusers", "uce"]
    assert yaml.safe_load(str(card).split("---")[1]) == data  # valid YAML front matter

    text = card.text
    assert "| vangogh | object |" in text and "Preserved on purpose: monet" in text
    assert "| `lam` | 0.5 |" in text
    assert "| vangogh | 0.1 | 0.5 | DDIMScheduler | 3 |" in text
    assert f"1. `{'ab' * 32}`" in text  # a parent not found beside the patch: by digest
    assert "**forget**" in text and "| `acc` | 0.0312 |" in text and "| retain acc | 0.97 |" in text
    assert "forget.acc" not in text  # nothing flattened into dotted keys
    assert "![Before and after the patch](before_after.png)" in text
    assert 'forgetpatch.apply(pipe, "org/no-vangogh", key_steps=True)' in text
    assert 'forgetpatch.apply(pipe, ["org/no-vangogh", "org/another-patch"])' in text
    assert f'pipe.load_lora_weights("org/no-vangogh", weight_name="{WEIGHTS_NAME}"' in text


def test_model_card_says_what_each_concept_is_steered_to(pipe):
    g = torch.Generator().manual_seed(0)
    factors = {path: (torch.randn(2, n_in, generator=g), torch.randn(n_out, 2, generator=g)) for path, (n_out, n_in)
               in MODULES.items()}  # fmt: skip
    concepts = [{"target": "circle", "guide": "cross"}, {"target": "star", "superclass": "cross"},
                {"target": "ring", "guide": ""}, {"target": "cat"}]  # fmt: skip
    text = render_card(build_patch(pipe, factors, name="x", method="m", concepts=concepts, lineage=[]), "org/x").text
    for row in ("| circle | object | cross |", "| star | object | its superclass, cross |",
                "| ring | object | (blank prompt) |", "| cat | object | (method default) |"):  # fmt: skip
        assert row in text, row
    assert "(circle -> cross, star -> cross)" in text  # the opening line names Dynamic Mask's superclass too


def test_model_card_shows_toy_figures_with_intervals(pipe):
    figures = {
        "ua": 0.9375,
        "leakage": 0.125,
        "n": {"ua": 96, "leakage": 16},
        "interval": {"ua": [0.87, 0.97], "leakage": [0.035, 0.36]},
        "base": {"ua": 0.0, "n": {"ua": 96}, "interval": {"ua": [0.0, 0.038]}},
        "ratios": {"ira": 0.98, "cra": 1.0, "near": None},
        "ratio_interval": {"ira": [0.9, 1.07], "cra": [0.95, 1.05]},
    }
    toy_eval = {"concepts": {"circle": figures}, "settings": {"images_per_concept": 16, "num_inference_steps": 25,
                                                              "guidance_scale": 4.0, "seed": 0}}
    card = render_card(make_patch(pipe, metrics={"toy_eval": toy_eval, "erase_seconds": 3.5}), "org/x")
    text = card.text
    # the one summary table comes before the folded details, base beside patched, interval and n on each rate
    headline = text.index("## How well it forgets")
    assert headline < text.index("<details>")
    assert "| **circle forgotten (strict UA)** | 94% [87-97%], n=96 | 0% [0-4%], n=96 |" in text
    assert "| circle in other words (paraphrase leakage, lower is better) | 12% [3-36%], n=16 | - |" in text
    # retention of the base's with the ratio's own interval (it was a bare "98%")
    assert "| circle | 94% [87-97%], n=96 | 0% [0-4%], n=96 | 12% [3-36%], n=16 | 98% [90-107%] | 100% [95-105%] | - |" in text
    assert "toy_eval" not in text and "| erase seconds | 3.5 |" in text  # no flattened evaluation keys
    # the headline figures are Hub evaluation results, and the YAML header parses back with huggingface_hub
    from huggingface_hub import ModelCard

    parsed = ModelCard(str(card)).data
    results = {(r.metric_type, r.metric_value) for r in parsed.eval_results}
    assert ("ua", 0.9375) in results and ("leakage", 0.125) in results
    ua = next(r for r in parsed.eval_results if r.metric_type == "ua")
    assert "n=96" in ua.metric_name and "[87-97%]" in ua.metric_name  # the Hub shows the point: name its interval
    assert ua.metric_args == {"n": 96, "interval_95": [0.87, 0.97]}
    assert parsed.model_name == card.data.model_name


def test_a_concept_or_name_shows_on_the_card_as_written_and_adds_no_markup(pipe):
    """A concept with a table's ``|``, a name with HTML and a quote: the card shows them as written (escaped), its
    tables keep their columns, the snippets stay valid Python, and the YAML header still parses."""
    import ast

    from huggingface_hub import ModelCard

    g = torch.Generator().manual_seed(0)
    factors = {path: (torch.randn(2, n_in, generator=g), torch.randn(n_out, 2, generator=g)) for path, (n_out, n_in)
               in MODULES.items()}  # fmt: skip
    concepts = [{"target": "Tom | Jerry", "guide": "<b>cat</b>"}]
    name = 'no-"tom"-<img src=x onerror=alert(1)>'
    card = render_card(build_patch(pipe, factors, name=name, method="m", concepts=concepts, lineage=[]), "org/x")
    text = card.text
    prose = "".join(text.split("```")[::2])  # outside code blocks, where Markdown renders HTML
    assert "<img" not in prose and "<b>" not in prose and "&lt;img src=x onerror=alert(1)&gt;" in prose
    assert "| Tom \\| Jerry | object | &lt;b&gt;cat&lt;/b&gt; |" in text
    snippet = next(line for line in text.splitlines() if "load_lora_weights" in line)
    ast.parse(snippet)  # the name is a Python string literal there
    assert ast.literal_eval(snippet.split("adapter_name=")[1].rstrip(")")) == "no-_tom_-_img_src_x_onerror_alert_1__"
    assert ModelCard(str(card)).data.library_name == "diffusers"


def test_parameters_and_figures_show_on_the_card_as_written(pipe):
    """A parameter's value is shown in code, where Markdown shows ``<`` itself: escaped to ``&lt;`` it read
    ``&lt;sks&gt;``. A figure's title was written raw (HTML in it rendered) and a per-layer key with ``|`` split its
    row; a value with a backtick or a line break broke its code span or its table."""
    g = torch.Generator().manual_seed(0)
    factors = {path: (torch.randn(2, n_in, generator=g), torch.randn(n_out, 2, generator=g)) for path, (n_out, n_in)
               in MODULES.items()}  # fmt: skip
    patch = build_patch(pipe, factors, name="p", method="m", concepts=[{"target": "cat"}], lineage=[],
                        params={"guide": "<sks> dog", "template": "a `{concept}`\nphoto"})  # fmt: skip
    patch.manifest.metrics.update({"<img src=x>": {"a|b": 1.5, "c": 2.0}, "note": "x<y"})
    text = render_card(patch, "org/x").text
    assert "| `guide` | `<sks> dog` |" in text and "&lt;sks" not in text
    assert "| `template` | ``a `{concept}` photo`` |" in text
    assert "<img" not in text and "**&lt;img src=x&gt;**" in text
    assert "| `a\\|b` | 1.5 |" in text and "| note | `x<y` |" in text


def test_figures_recorded_in_another_shape_are_named_not_fatal(pipe, tmp_path):
    """A patch whose evaluation or attack record has another shape (figures written by hand through record_metrics,
    another tool, a Hub patch that passes verification): render_card and inspect failed with TypeError or
    AttributeError; they now leave that record out of the summaries and say it is there. A NaN figure is refused
    instead of being stored as null."""
    from forgetpatch.cli.inspect import patch_table
    from forgetpatch.errors import ManifestError
    from forgetpatch.format import record_metrics
    from forgetpatch.hub import readable

    for metrics, unreadable in [
        ({"toy_eval": [1, 2]}, ["toy_eval"]),
        ({"toy_eval": {"concepts": {"circle": {"ua": 0.9, "interval": {"ua": [0.8]}}}}}, ["toy_eval"]),
        ({"robustness": ["circle"]}, ["robustness"]),
        ({"robustness": {"circle": {"attacks": {"x": {"ua_after": "low"}}}}}, ["robustness"]),
        ({"toy_eval": {"concepts": {"circle": {"ua": "0.9"}}}}, []),  # read as the number it writes
    ]:
        patch = make_patch(pipe, metrics=metrics)
        assert readable(patch.manifest.metrics)[1] == unreadable
        text = render_card(patch, "org/x").text
        table = " ".join(str(cell) for column in patch_table(patch).columns for cell in column._cells)
        if unreadable:
            assert "recorded in a shape forgetpatch does not read" in text and "does not read" in table
        else:
            assert "| **circle forgotten (strict UA)** | 90% | - |" in text
    folder = make_patch(pipe).save(tmp_path / "p")
    before = (folder / "forgetpatch.json").read_bytes()
    with pytest.raises(ManifestError, match=r"metrics\['mine'\]\['ua'\] is nan"):
        record_metrics(folder, lambda patch: {"mine": {"ua": float("nan")}})
    assert (folder / "forgetpatch.json").read_bytes() == before


def test_model_card_minimal(pipe):
    patch = make_patch(pipe, base_model_id=None)
    card = render_card(patch, "org/x", license="mit")
    assert "base_model" not in card.data.to_dict() and card.data.license == "mit"
    assert "acts on every denoising step" in card.text and "Computed on the base model alone" in card.text
    assert "## Metrics" not in card.text and "Before / after" not in card.text
    assert "key_steps=True" not in card.text


# --- the test server itself ----------------------------------------------------------------------
def test_test_hub_is_bounded_and_stops_by_itself():
    import httpx2

    server = HubServer(lifetime=0.3, max_body=1024).start()
    assert server.endpoint.startswith("http://127.0.0.1:")
    too_big = httpx2.post(f"{server.endpoint}/api/repos/create", content=b"x" * 2048)
    assert too_big.status_code == 413
    assert server.join(timeout=5)  # the lifetime timer shut it down
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(f"{server.endpoint}/api/models/org/x", timeout=1)


def test_a_patch_made_on_a_hub_model_names_it_on_its_card(tmp_path):
    """What a user does: load the base by Hub id (offline, from the cache), erase, render the card. The manifest
    names the base (``base_model.id``) and the card's YAML links to it as an adapter (``base_model``)."""
    home = tmp_path / "home"
    commit = hashlib.sha1(b"org/tiny-sd").hexdigest()
    repo = home / "hub" / "models--org--tiny-sd"
    tiny_sd_pipeline(seed=0).save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    script = (
        "import json, forgetpatch\n"
        "from diffusers import DiffusionPipeline\n"
        "from forgetpatch.hub import render_card\n"
        "pipe = DiffusionPipeline.from_pretrained('org/tiny-sd')\n"
        "patch = forgetpatch.erase(pipe, ['circle'], method='uce', progress=False)\n"
        "card = render_card(patch, 'me/no-circle')\n"
        "print(json.dumps([patch.manifest.base_model.id, card.data.base_model, card.data.base_model_relation]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["org/tiny-sd", "org/tiny-sd", "adapter"]

    # the same from the command line, without huggingface_hub's "Could not reach the Hub" notice on the way
    cli = [sys.executable, "-m", "forgetpatch.cli", "erase", "--base", "org/tiny-sd", "-c", "circle", "-o"]
    out = subprocess.run([*cli, str(tmp_path / "no-circle")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Could not reach the Hub" not in out.stdout + out.stderr
    assert read_patch(tmp_path / "no-circle").manifest.base_model.id == "org/tiny-sd"


def test_a_base_is_loaded_by_hub_id_at_a_revision_and_a_toy_export_by_id_keeps_the_toy_settings(tmp_path, hf_env):
    """``--base org/name@revision`` loads that commit from the cache; a patch recording its base's revision says which
    one when another is loaded; a toy-world export in the cache loads by its id with the toy world's settings.
    (In this process, offline from a hand-built cache: ``test_a_patch_made_on_a_hub_model_names_it_on_its_card``
    runs the command in a fresh process configured by the environment.)"""
    hf_env(HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there; nothing is asked
    hub = Path(huggingface_hub.constants.HF_HUB_CACHE)
    repo = hub / "models--org--tiny-sd"
    old, new = hashlib.sha1(b"old").hexdigest(), hashlib.sha1(b"new").hexdigest()
    tiny_sd_pipeline(seed=0).save_pretrained(repo / "snapshots" / old)
    tiny_sd_pipeline(seed=1).save_pretrained(repo / "snapshots" / new)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(new)
    toy_commit = hashlib.sha1(b"toy").hexdigest()
    toy_repo = hub / "models--org--toy-sd"
    from forgetpatch import toy
    from forgetpatch.cli import app

    toy.pipeline().save_pretrained(toy_repo / "snapshots" / toy_commit)
    (toy_repo / "refs").mkdir()
    (toy_repo / "refs" / "main").write_text(toy_commit)

    def cli(*args: str):
        return CliRunner().invoke(app, list(map(str, args)))

    # by id at a commit (it recorded no revision, so a refusal named the model the user had), as by snapshot folder
    made = cli("erase", "--base", f"org/tiny-sd@{old}", "-c", "circle", "-m", "uce", "-o", tmp_path / "p")
    assert made.exit_code == 0, made.output
    assert read_patch(tmp_path / "p").manifest.base_model.revision == old
    moved = cli("apply", "--base", "org/tiny-sd", tmp_path / "p", "-p", "a circle", "-o", tmp_path / "x.png",
                "--steps", "1")  # fmt: skip
    said = " ".join(moved.output.split())
    assert moved.exit_code == 1 and "Traceback" not in said
    assert f"--base org/tiny-sd@{old}" in said, said
    pinned = cli("apply", "--base", f"org/tiny-sd@{old}", tmp_path / "p", "-p", "a circle", "-o", tmp_path / "x.png",
                 "--steps", "1")  # fmt: skip
    assert pinned.exit_code == 0, pinned.output
    # the toy world by its Hub id: steered to the cross and the other shapes preserved, as with --base toy
    by_id = cli("erase", "--base", "org/toy-sd", "-c", "circle", "-o", tmp_path / "t")
    assert by_id.exit_code == 0, by_id.output
    concept = read_patch(tmp_path / "t").manifest.concepts[0]
    assert concept.steered_to == "cross", concept


def test_the_summary_names_what_retention_keeps_for_each_kind_of_concept():
    """A colour's in-domain retention (other colours kept) was labelled "other shapes kept", and its cross-domain
    retention "colours and textures kept"."""
    from forgetpatch.hub import summary_rows

    def figures(kind):
        return {"kind": kind, "ua": 0.9, "ira": 0.95, "cra": 1.0}

    metrics = {"toy_eval": {"concepts": {"red": figures("colour"), "circle": figures("shape"),
                                         "dots": figures("texture")}}}  # fmt: skip
    said = [row["what"] for row in summary_rows(metrics)]
    for own, other in (("other colours", "shapes and textures"), ("other shapes", "colours and textures"),
                       ("other textures", "shapes and colours")):  # fmt: skip
        assert f"{own} kept (in-domain retention)" in said and f"{other} kept (cross-domain retention)" in said


def test_push_refuses_what_it_would_publish_wrongly_before_any_request(pipe, tmp_path, hub):
    """A repo id without an org made a repo and then failed; ``private=True`` on an existing public repo published
    the patch publicly, saying nothing."""
    from huggingface_hub import HfApi

    folder = _saved(make_patch(pipe), tmp_path / "p")
    before = list(hub.state.requests)
    for bad in ("no-circle", "org/a..b", "org/x/y", ""):
        with pytest.raises(HubError, match="is not a Hub repo id"):
            push(folder, bad)
    assert hub.state.requests == before and not any("no-circle" in r for r in hub.state.repos)
    HfApi().create_repo("org/team")  # public, e.g. made on the website
    with pytest.raises(HubError, match="exists and is public.*private on the Hub first"):
        push(folder, "org/team", private=True)
    repo = hub.state.repos["org/team"]
    assert not repo.private and MANIFEST_NAME not in repo.commits[repo.branches["main"]].files
    push(folder, "org/team")  # as public, said so
    push(folder, "org/new-private", private=True)
    assert hub.state.repos["org/new-private"].private
    push(folder, "org/new-private", private=True)  # a private repo takes it again


def test_a_patch_read_from_a_folder_is_pushed_as_that_folder(pipe, tmp_path, hub):
    """``push(forgetpatch.load(folder))`` left out the folder's before/after image and named the parents by digest
    only, where ``push(folder)`` keeps both."""
    parent = make_patch(pipe, name="step-1", seed=1)
    _saved(parent, tmp_path / "chain" / "step-1")
    child = make_patch(pipe, name="step-2", seed=2, lineage=[parent.digest])
    folder = _saved(child, tmp_path / "chain" / "step-2", extra={"grid.png": b"\x89PNG\r\n\x1a\nimg"})
    push(forgetpatch.load(folder), "org/step-2")
    repo = hub.state.repos["org/step-2"]
    files = repo.commits[repo.branches["main"]].files
    assert "grid.png" in files
    card = files["README.md"].decode()
    assert "**step-1**" in card and "![Before and after the patch](grid.png)" in card
    changed = forgetpatch.load(folder)
    changed.manifest.metrics["mine"] = 1.0  # changed in memory: pushed as it is now
    push(changed, "org/step-2-changed")
    repo = hub.state.repos["org/step-2-changed"]
    assert '"mine": 1.0' in repo.commits[repo.branches["main"]].files[MANIFEST_NAME].decode()


def test_the_card_snippets_run_as_written(pipe, tmp_path):
    """The plain-diffusers snippet named the adapter after the patch (``adapter_name="no.circle v1.0"``), which peft
    refuses; a toy patch's snippet used ``pipe`` without making it; two different figures were both "in-domain
    retention"."""
    import re

    patch = make_patch(pipe, name="no.circle v1.0")
    folder = _saved(patch, tmp_path / "p")
    text = render_card(folder, "org/no-circle").text
    [snippet] = re.findall(r"pipe\.load_lora_weights\((.*)\)", text)
    assert 'adapter_name="no_circle_v1_0"' in snippet
    fresh = tiny_sd_pipeline(seed=0)
    fresh.load_lora_weights(str(folder), weight_name=WEIGHTS_NAME, adapter_name="no_circle_v1_0")
    toy = forgetpatch.erase(forgetpatch.toy.pipeline(), ["circle"], method="uce", progress=False)
    toy_text = render_card(toy, "org/no-circle").text
    code = toy_text.split("```python")[1].split("```")[0]
    assert "pipe = forgetpatch.toy.pipeline()" in code
    namespace: dict = {}
    exec(code.replace('"org/no-circle"', "toy_patch"), {"toy_patch": toy} | namespace)  # the snippet, as written
    assert "retention / base" in render_card(make_patch(pipe, metrics={"toy_eval": {"concepts": {"circle": {
        "ua": 1.0, "ira": 0.5, "ratios": {"ira": 0.9}}}}}), "org/x").text  # fmt: skip


def test_figures_are_not_recorded_into_the_hub_cache(pipe, hub, tmp_path):
    """``eval --record`` on a cache snapshot (what ``snapshot_download`` returns) replaced its links with files
    and every later load of that id read figures the Hub's commit does not have."""
    from forgetpatch.cli import app
    from forgetpatch.format import record_metrics

    push(make_patch(pipe), "org/c")
    snapshot = download("org/c")
    with pytest.raises(HubError, match="snapshot in the Hugging Face cache.*local_dir="):
        record_metrics(snapshot, lambda p: {"mine": 1.0})
    result = CliRunner().invoke(app, ["eval", str(snapshot), "--record", "--images", "1"])
    assert result.exit_code != 0 and "local_dir=" in " ".join(result.output.split()), result.output
    assert "mine" not in forgetpatch.load("org/c").manifest.metrics
    assert all(p.is_symlink() for p in snapshot.iterdir())


def test_a_private_repo_hint_names_what_loading_takes(pipe, hub, hf_env):
    """The hint said "pass token=...", which ``load``, ``apply`` and the CLI do not take."""
    push(make_patch(pipe), "org/secret", private=True)
    hf_env(HF_TOKEN=None)
    with pytest.raises(HubError) as caught:
        forgetpatch.load("org/secret")
    assert "HF_TOKEN" in str(caught.value) and "token=" not in str(caught.value)


def test_an_unreachable_hub_is_one_line_in_the_cli_without_the_retry_chatter(hf_env, monkeypatch, capfd):
    """huggingface_hub retries an unreachable Hub five times and logs two lines each time (ten lines of "Retrying in
    8s" before forgetpatch's error). The CLI shows the one line, with the way to skip the wait."""
    from huggingface_hub.utils import _http

    from forgetpatch.cli import app

    hf_env(HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(_http.time, "sleep", lambda seconds: None)  # the retries, without their 23 s of waiting
    result = CliRunner().invoke(app, ["inspect", "org/nowhere"])
    shown = result.output + "".join(capfd.readouterr())
    assert result.exit_code == 1, shown
    assert "check your connection (working offline, HF_HUB_OFFLINE=1" in shown
    assert "Retrying" not in shown and "thrown while requesting" not in shown
