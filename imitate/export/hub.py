"""Push an exported dataset folder to the Hugging Face Hub: `imitate export DIR --out FOLDER --hub user/name`.

Through `huggingface_hub` only: `HfApi.create_repo(repo_type="dataset", private=...)`, then
`HfApi.upload_folder` in one commit that also deletes the repo's older `data/` files (a re-export with fewer
shards leaves no stale shard behind for `data/train-*` to pick up). `HF_ENDPOINT` points it at another Hub.

The token is huggingface_hub's own lookup (`HF_TOKEN`, else the login saved by `hf auth login`); imitate
passes it to `HfApi` and masks it in every file it writes, and never prints, logs or stores it. Without a token
the push stops before anything is sent. `--private` on a repo that already exists as public is refused: the
Hub ignores the flag for an existing repo, and the data would go out public.

Every failure is one `HubError` line: the HTTP status and the Hub's message (401/403: the token; 404: the
namespace), a network error, or `HF_HUB_OFFLINE` being set.
"""

from __future__ import annotations

import re
from pathlib import Path

from imitate.config import redact_text
from imitate.errors import ConfigError, HubError, InputError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise InputError(f"--hub {repo_id!r}: not a Hub repo id", hint="use user/name or org/name")
    return repo_id


def hub_token() -> str:
    """The token huggingface_hub would use; ConfigError (before any work) when there is none."""
    try:
        from huggingface_hub import get_token
    except ImportError as exc:
        raise ConfigError("--hub needs huggingface_hub", hint="pip install 'imitate[hub]'") from exc
    token = get_token()
    if not token:
        raise ConfigError("no Hugging Face token for --hub", hint="set HF_TOKEN or log in with `hf auth login`")
    return token


def _errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError derives from its HTTP library's error class (httpx2 now, requests before), whose transport
    # errors (refused, DNS, timeouts) share that base; OSError covers OfflineModeIsEnabled and sockets.
    return (HfHubHTTPError, HfHubHTTPError.__mro__[1], OSError)


def _message(exc: BaseException, token: str) -> str:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = redact_text(text, [token])
    if status in (401, 403):
        text += " (check the token's write permission for this namespace)"
    return text


def push(folder: Path, repo_id: str, *, private: bool, token: str, commit_message: str) -> str:
    """Create the dataset repo (if needed) and upload `folder` to it; returns the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        try:
            url = str(api.create_repo(repo_id, repo_type="dataset", private=private))
        except HfHubHTTPError as exc:
            if getattr(exc.response, "status_code", None) != 409:
                raise
            url = f"{api.endpoint}/datasets/{repo_id}"  # it exists: pushing a new version
            if private and not api.dataset_info(repo_id).private:
                raise HubError(
                    f"--hub {repo_id}: the repo exists and is public; --private cannot make it private",
                    hint="make it private on the Hub first, or push without --private",
                ) from None
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="dataset",
            commit_message=commit_message,
            delete_patterns=["data/*"],
        )
    except _errors() as exc:
        raise HubError(f"push to {repo_id} failed: {_message(exc, token)}") from exc
    except ValueError as exc:  # huggingface_hub's own checks: an invalid card, a bad repo id
        raise HubError(f"push to {repo_id} refused: {_message(exc, token)}") from exc
    return url
