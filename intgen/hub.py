"""Push an exported dataset to the Hugging Face Hub.

Only the dataset's own files go up — the card, each config's parquet file and the HTML report (`intgen
report`, unless `--no-report`) — never whatever else lies in the folder (temporary files of an interrupted
write, say).
The card uploaded points its examples at the repo; the local card is changed only after the upload
succeeded. The token comes from the usual places (`HF_TOKEN`, `hf auth login`); it is never printed or
written. Transient failures (429, 5xx, dropped connections) are retried with backoff; a failure after that
is one line naming the endpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from intgen.errors import UserError

log = logging.getLogger(__name__)
DEFAULT_ENDPOINT = "https://huggingface.co"


class PushError(UserError):
    """The push did not happen; the message says where it went wrong."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        return status is None or status == 429 or status >= 500
    return isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__name__ in (
        "ConnectError", "ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "ReadError",
    )


def dataset_files(dataset_dir: Path) -> list[Path]:
    """The files a push uploads: each config's parquet file (the card and the report are sent apart)."""
    return sorted(dataset_dir.glob("*/train-*.parquet"))


def push_dataset(
    dataset_dir: Path,
    repo_id: str,
    card: str,
    *,
    private: bool = False,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    max_tries: int = 5,
    report: Path | None = None,
) -> str:
    """Create the dataset repo if needed and upload the dataset's files, `card` (its README.md) and the HTML
    `report` (as report.html) in one commit; returns the commit URL."""
    files = dataset_files(dataset_dir)
    if not files:
        raise PushError(f"{dataset_dir}: no exported dataset (run `intgen export` first)")
    where = endpoint or DEFAULT_ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    retrying = retry(
        retry=retry_if_exception(_transient), stop=stop_after_attempt(max_tries),
        wait=wait_exponential_jitter(initial=1, max=30), reraise=True,
    )
    operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]
    operations += [CommitOperationAdd(path_in_repo=str(f.relative_to(dataset_dir)), path_or_fileobj=str(f))
                   for f in files]
    if report is not None:
        operations.append(CommitOperationAdd(path_in_repo="report.html", path_or_fileobj=str(report)))
    try:
        retrying(api.create_repo)(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision:
            retrying(api.create_branch)(repo_id, repo_type="dataset", branch=revision, exist_ok=True)
        commit = retrying(api.create_commit)(
            repo_id=repo_id, repo_type="dataset", operations=operations, revision=revision,
            commit_message="Upload intervention dataset made with intgen",
        )
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "no status"
        raise PushError(f"{where}: the Hub refused the push to {repo_id} (HTTP {status}: "
                        f"{str(exc).splitlines()[0]})") from None
    except Exception as exc:  # connection refused, DNS, TLS, timeouts: after the retries
        raise PushError(f"{where}: cannot reach the Hub to push {repo_id} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return str(commit)
