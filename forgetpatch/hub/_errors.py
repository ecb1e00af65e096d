"""Turn ``huggingface_hub`` exceptions into :class:`~forgetpatch.errors.HubError` with a clear message."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from forgetpatch.errors import HubError


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _transport_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the HTTP library under huggingface_hub (an answer that is not valid HTTP, ...)."""
    return type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3")


def _token_hint(upload: bool) -> str:
    """How to give a token: ``push`` takes ``token=``; loading by id (``load``, ``apply``, the CLI) reads the saved one."""
    return "pass token=..., set HF_TOKEN or run `hf auth login`" if upload else "set HF_TOKEN or run `hf auth login`"


@contextmanager
def hub_errors(
    repo_id: str, revision: str | None = None, filename: str | None = None, *, upload: bool = False
) -> Iterator[None]:
    """Re-raise Hub client errors met inside the block as :class:`HubError` naming repo, revision and file
    (worded for an upload with ``upload=True``)."""
    where = _where(repo_id, revision) + (f" (file {filename!r})" if filename else "")
    try:
        yield
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id (expected 'org/name'): {exc}") from exc
    except LocalTokenNotFoundError as exc:
        raise HubError(
            f"no Hub token to {'upload to' if upload else 'read'} {where}: {_token_hint(upload)}."
        ) from exc
    except GatedRepoError as exc:
        raise HubError(
            f"Hub repo {repo_id} is gated: accept its conditions on the Hub, then {_token_hint(upload)}."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} was not found at {constants.ENDPOINT}. Check the name; if it is private, "
            f"{_token_hint(upload)}."
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} has no revision {revision!r} (no such branch, tag or commit)."
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise HubError(
            f"Hub repo {_where(repo_id, revision)} has no file {filename!r}; is it a forgetpatch patch? "
            "A patch repo holds forgetpatch.json and pytorch_lora_weights.safetensors."
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if upload:
            why = "HF_HUB_OFFLINE is set: unset it to push" if constants.is_offline_mode() else "check your connection"
            raise HubError(f"cannot upload to Hub repo {where} at {constants.ENDPOINT}: {why}.") from exc
        if constants.is_offline_mode():
            raise HubError(
                f"Hub repo {where} is not in the local Hub cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set: download it once while online, or unset HF_HUB_OFFLINE."
            ) from exc
        raise HubError(
            f"Could not reach the Hub at {constants.ENDPOINT} for {where} and it is not in "
            f"the local cache ({constants.HF_HUB_CACHE}): check your connection (working offline, HF_HUB_OFFLINE=1 "
            "skips the Hub's retries)."
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        detail = (getattr(exc, "server_message", None) or "").strip().replace("\n", " ")
        hint = (
            " Check that your token (token=..., HF_TOKEN) has write access." if status in (401, 403) else ""
        )
        raise HubError(
            f"The Hub refused a request for {where} (HTTP {status}: {detail or exc}).{hint}"
        ) from exc
    except Exception as exc:
        if not _transport_error(exc):
            raise
        doing = "to upload " if upload else "for "
        raise HubError(
            f"The Hub at {constants.ENDPOINT} could not be reached or gave no valid answer {doing}{where}: "
            f"{type(exc).__name__}: {exc}. Check your connection and HF_ENDPOINT."
        ) from exc
