"""Push an exported dataset to the Hugging Face Hub.

The token comes from the usual places (`HF_TOKEN`, `huggingface-cli login`); it is never printed or
written. Transient failures (429, 5xx, dropped connections) are retried with backoff.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

log = logging.getLogger(__name__)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status == 429 or status >= 500
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "ReadError",
    )


def push_dataset(
    dataset_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    max_tries: int = 5,
) -> str:
    """Create the dataset repo if needed and upload the folder in one commit; returns the commit URL."""
    if not (dataset_dir / "README.md").is_file():
        raise FileNotFoundError(f"{dataset_dir}: no exported dataset (run `intgen export` first)")
    api = HfApi(endpoint=endpoint, token=token)
    retrying = retry(
        retry=retry_if_exception(_transient), stop=stop_after_attempt(max_tries),
        wait=wait_exponential_jitter(initial=1, max=30), reraise=True,
    )
    retrying(api.create_repo)(repo_id, repo_type="dataset", private=private, exist_ok=True)
    if revision:
        retrying(api.create_branch)(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
    commit = retrying(api.upload_folder)(
        repo_id=repo_id, repo_type="dataset", folder_path=str(dataset_dir), revision=revision,
        commit_message="Upload intervention dataset made with intgen",
    )
    return str(commit)
