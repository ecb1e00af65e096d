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
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from forgetpatch.errors import HubError


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None) -> Iterator[None]:
    """Re-raise Hub client errors met inside the block as :class:`HubError` naming repo, revision and file."""
    where = _where(repo_id, revision)
    try:
        yield
    except HFValidationError as exc:
        raise HubError(f"{repo_id!r} is not a valid Hub repo id (expected 'org/name'): {exc}") from exc
    except GatedRepoError as exc:
        raise HubError(
            f"Hub repo {repo_id} is gated: accept its conditions on the Hub and pass token=... "
            "(or set HF_TOKEN / run `hf auth login`)."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} was not found at {constants.ENDPOINT}. Check the name; if it is private, "
            "pass token=... (or set HF_TOKEN / run `hf auth login`)."
        ) from exc
    except RevisionNotFoundError as exc:
        raise HubError(
            f"Hub repo {repo_id} has no revision {revision!r} (no such branch, tag or commit)."
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise HubError(
            f"Hub repo {where} has no file {filename!r}; is it a forgetpatch patch? "
            "A patch repo holds forgetpatch.json and pytorch_lora_weights.safetensors."
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if constants.is_offline_mode():
            raise HubError(
                f"Hub repo {where} (file {filename!r}) is not in the local Hub cache ({constants.HF_HUB_CACHE}) "
                "and HF_HUB_OFFLINE is set: download it once while online, or unset HF_HUB_OFFLINE."
            ) from exc
        raise HubError(
            f"Could not reach the Hub at {constants.ENDPOINT} for {where} (file {filename!r}) and it is not in "
            f"the local cache ({constants.HF_HUB_CACHE}): check your connection."
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
