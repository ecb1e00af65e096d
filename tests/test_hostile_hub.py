"""Hostile Hub answers and hostile references, through the loopback Hub of ``hub_server.py`` (issue 14).

The test Hub is honest; a hostile Hub is played by editing its state behind the client's back
(``hub.tamper``, extra branches), which is what a compromised or malicious endpoint can answer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
from test_hub import TOKEN, hf_env, hub, make_patch, pipe  # noqa: F401  (fixtures)

import forgetpatch
from forgetpatch.errors import HubError, IntegrityError, ManifestError, UnverifiedPatchError
from forgetpatch.format import HEADER_MANIFEST_KEY, MANIFEST_NAME, WEIGHTS_NAME, read_patch, sha256_file
from forgetpatch.hub import download, push, split_ref

BAD_REVISIONS = {
    "dotdot-escape": "../../../../escape",
    "dotdot-inside": "a..b",
    "leading-slash": "/main",
    "trailing-slash": "main/",
    "double-slash": "a//b",
    "leading-dash": "-rf",
    "lock-suffix": "main.lock",
    "trailing-dot": "main.",
    "hidden-component": "a/.b",
    "space": "a b",
    "tilde": "main~1",
    "caret": "main^",
    "colon": "a:b",
    "question-mark": "a?",
    "star": "a*",
    "bracket": "a[1]",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "del": "a\x7fb",
    "at-brace": "main@{1}",
    "lone-at": "@",
    "empty": "",
    "too-long": "a" * 300,
}
GOOD_REVISIONS = [
    "main",
    "v1.0",
    "refs/pr/1",
    "feature/x-y_z",
    "0123456789abcdef0123456789abcdef01234567",
    "a@b",
]


@pytest.mark.parametrize("revision", GOOD_REVISIONS)
def test_good_revisions_pass(revision):
    assert split_ref(f"org/x@{revision}") == ("org/x", revision)
    assert split_ref("org/x", revision) == ("org/x", revision)


@pytest.mark.parametrize("revision", list(BAD_REVISIONS.values()), ids=list(BAD_REVISIONS))
def test_hostile_revisions_are_refused_before_any_request(pipe, hub, revision):  # noqa: F811
    seen = len(hub.state.requests)
    for call in (
        lambda: download("org/x", revision=revision),
        lambda: download(f"org/x@{revision}"),
        lambda: push(make_patch(pipe), "org/x", revision=revision),
    ):
        with pytest.raises(HubError, match="revision"):
            call()
    assert len(hub.state.requests) == seen


@pytest.mark.parametrize("bad", ["../../../../escape", "not-a-commit"])
def test_hostile_endpoint_cannot_write_outside_the_cache(pipe, hub, tmp_path, bad):  # noqa: F811
    """Asked for ``main``, the Hub answers that its commit is ``../../../../escape`` (the client would make its
    snapshot folder there, outside the cache; huggingface_hub refuses it with a ValueError, which reached the user
    raw) or a name that is no commit id. (A revision of such a name is refused before any request: the test above.)"""
    from dataclasses import replace

    push(make_patch(pipe), "org/x")
    repo = hub.state.repos["org/x"]
    repo.commits[bad] = replace(repo.commits[repo.branches["main"]], oid=bad)
    repo.branches["main"] = bad
    seen = len(hub.state.requests)
    for call in (lambda: forgetpatch.load("org/x"), lambda: download("org/x")):
        with pytest.raises(HubError, match="refus"):
            call()
    assert len(hub.state.requests) > seen  # the Hub was asked, and its answer refused
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    outside = [p for p in tmp_path.rglob("*") if p.name == "escape" and not p.is_relative_to(cache)]
    assert outside == []


# --- tampered and extra files -------------------------------------------------------------------
def test_tampered_listed_file_is_refused(pipe, hub, tmp_path):  # noqa: F811
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "grid.png").write_bytes(b"png")
    make_patch(pipe).save(folder)
    push(folder, "org/x")
    hub.tamper("org/x", "grid.png", b"another picture")
    with pytest.raises(IntegrityError, match="grid.png"):
        download("org/x")


def test_tampered_manifest_is_refused(pipe, hub):  # noqa: F811
    push(make_patch(pipe), "org/x")
    manifest = json.loads(hub.file("org/x", MANIFEST_NAME))
    manifest["lora"]["alpha"] = 40.0  # ten times stronger, files table untouched
    hub.tamper("org/x", MANIFEST_NAME, json.dumps(manifest).encode())
    with pytest.raises(ManifestError, match="disagrees"):
        forgetpatch.load("org/x")


def _relist(hub, repo_id: str, extra: dict[str, str]) -> None:  # noqa: F811
    manifest = json.loads(hub.file(repo_id, MANIFEST_NAME))
    manifest["files"].update(extra)
    hub.tamper(repo_id, MANIFEST_NAME, json.dumps(manifest).encode())


def test_listed_file_missing_on_the_hub(pipe, hub):  # noqa: F811
    push(make_patch(pipe), "org/x")
    _relist(hub, "org/x", {"extra.bin": "0" * 64})
    with pytest.raises(HubError, match="extra.bin"):
        download("org/x")


def test_extra_files_on_the_hub_are_not_downloaded(pipe, hub):  # noqa: F811
    patch = make_patch(pipe)
    push(patch, "org/x")
    hub.tamper("org/x", "unlisted.py", b"print('hi')")
    snapshot = download("org/x")
    assert not (snapshot / "unlisted.py").exists()
    assert read_patch(snapshot).digest == patch.digest


@pytest.mark.parametrize(
    "name",
    ["../../x", "/etc/hostname", "a/../../x", "..\\..\\x", "a\x00b", ""],
    ids=["dotdot", "absolute", "inner-dotdot", "backslash", "nul", "empty"],
)
def test_manifest_listing_paths_out_of_the_patch(pipe, hub, name):  # noqa: F811
    push(make_patch(pipe), "org/x")
    _relist(hub, "org/x", {name: "0" * 64})
    seen = len(hub.state.requests)
    with pytest.raises(IntegrityError, match="outside the patch|not a file name"):
        download("org/x")
    fetched = [p for m, p in hub.state.requests[seen:] if m in ("GET", "HEAD")]
    assert all(p.endswith((MANIFEST_NAME,)) for p in fetched)  # nothing but the manifest was asked for


@pytest.mark.parametrize(
    "manifest",
    [b"[" * 5000 + b"]" * 5000, b"{" + b" " * (9 << 20) + b"}", b"\xff\xfe"],
    ids=["deep", "9MiB", "not-utf8"],
)
def test_hostile_manifest_text(pipe, hub, manifest):  # noqa: F811
    push(make_patch(pipe), "org/x")
    hub.tamper("org/x", MANIFEST_NAME, manifest)
    with pytest.raises(ManifestError):
        download("org/x")


# --- old patches (format v0) are downloadable, and refused unless the caller opts in ---------------------
def _v0_repo(pipe, hub, tmp_path, repo_id: str, with_files: bool) -> None:  # noqa: F811
    from safetensors.torch import save_file

    patch = make_patch(pipe)
    lora = patch.manifest.lora
    v0 = {"format_version": 0, "name": "old", "method": "uce", "concepts": ["vangogh"], "base_model": "sd15",
          "rank": lora.rank, "alpha": lora.alpha, "target_modules": lora.target_modules}  # fmt: skip
    weights = tmp_path / WEIGHTS_NAME
    save_file(patch.state_dict, str(weights), metadata={HEADER_MANIFEST_KEY: json.dumps(v0)})
    if with_files:
        v0["files"] = {WEIGHTS_NAME: sha256_file(weights)}
    push(make_patch(pipe, name="placeholder"), repo_id)
    hub.tamper(repo_id, WEIGHTS_NAME, weights.read_bytes())
    hub.tamper(repo_id, MANIFEST_NAME, json.dumps(v0).encode())


@pytest.mark.parametrize("with_files", [True, False], ids=["with-files-table", "without-files-table"])
def test_v0_patch_is_downloadable_with_opt_in(pipe, hub, tmp_path, with_files):  # noqa: F811
    _v0_repo(pipe, hub, tmp_path, "org/old", with_files)
    if with_files:  # its files are checked; what cannot be checked is the base model
        folder = download("org/old")
    else:
        with pytest.raises(UnverifiedPatchError, match="allow_unverified"):
            download("org/old")
        folder = download("org/old", allow_unverified=True)
    with pytest.raises(UnverifiedPatchError, match="allow_unverified"):
        read_patch(folder)
    assert read_patch(folder, allow_unverified=True).name == "old"


# --- push publishes only the patch's own files ---------------------------------------------------------
def test_push_leaves_private_files_out(pipe, hub, tmp_path):  # noqa: F811
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    (folder / "notes.tmp").write_text("mine")
    (folder / "grid.png").write_bytes(b"png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_patch(pipe).save(folder)
    push(folder, "org/x")
    repo = hub.state.repos["org/x"]
    assert set(repo.commits[repo.branches["main"]].files) == {".gitattributes", "README.md", MANIFEST_NAME,
                                                              WEIGHTS_NAME, "grid.png"}  # fmt: skip


def test_push_of_a_folder_that_lists_a_private_file(pipe, hub, tmp_path):  # noqa: F811
    """A folder written by an older forgetpatch, whose manifest lists a .env: it is not published."""
    patch = make_patch(pipe)
    folder = patch.save(tmp_path / "p")
    (folder / ".env").write_text("HF_TOKEN=hf_secret")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"][".env"] = sha256_file(folder / ".env")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match=r"\.env"):
        push(folder, "org/x")
    repo = hub.state.repos["org/x"]
    assert ".env" not in repo.commits[repo.branches["main"]].files
    assert read_patch(download("org/x")).digest == patch.digest


def test_push_refuses_a_listed_symlink_out_of_the_folder(pipe, hub, tmp_path):  # noqa: F811
    folder = make_patch(pipe).save(tmp_path / "p")
    (tmp_path / "id_rsa").write_text("PRIVATE KEY")
    (folder / "grid.png").symlink_to(tmp_path / "id_rsa")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["files"]["grid.png"] = sha256_file(tmp_path / "id_rsa")
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="grid.png"):
        push(folder, "org/x")
    assert "org/x" not in hub.state.repos


def test_an_answer_that_is_not_http_is_a_hub_error():
    import httpx2

    from forgetpatch.hub._errors import hub_errors

    with pytest.raises(HubError, match="no valid answer"), hub_errors("org/x", "main", MANIFEST_NAME):
        raise httpx2.RemoteProtocolError("illegal header line")
