"""Publishing a checkpoint folder to the Hugging Face Hub: check it, build the card, upload, print the URL.

The folder is checked completely before any network call, so a half-written or corrupt checkpoint is
refused in a second instead of being published. The upload is one commit of exactly the checked files
(plus the model card) through huggingface_hub's `create_commit`: large files go through LFS or Xet, and
files the Hub already holds are recognised by their hashes and skipped. That is what makes a repeat push
cheap and an interrupted push resumable by simply running it again.

Push is read-only on the local folder: a generated card is uploaded as README.md but never written into
the folder (the folder may be a read-only cache snapshot, and an artifact should not change because it
was published). `--dry-run` prints the card, so it can be saved and edited as the folder's README.md,
which later pushes then keep.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from moeify.arch.consistency import check_checkpoint
from moeify.errors import HubError, InputError, UsageError
from moeify.io.output import LOCK_SUFFIX, TMP_PREFIX, writer_pid
from moeify.io.reader import INDEX_NAME, CheckpointReader, load_json
from moeify.metadata import METADATA_NAME
from moeify.progress import SILENT, Reporter

T = TypeVar("T")

DEFAULT_ENDPOINT = "https://huggingface.co"
CARD_NAME = "README.md"
# Names that only an unfinished write leaves behind: a folder holding one is not a finished checkpoint.
PARTIAL_SUFFIXES = (".incomplete", ".part", ".partial", ".tmp", ".lock", LOCK_SUFFIX)
# Hidden entries that belong to tools, not to the model: skipped, never uploaded.
SKIPPED_HIDDEN = (".git", ".cache", ".DS_Store", ".ipynb_checkpoints", ".gitattributes")
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
RETRIES = 4
BACKOFF_SECONDS = 2.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class PushFile:
    """One file of the upload: its path in the repo, its size, and where its bytes come from."""

    path: str
    size: int
    local: Path | None = None  # None for generated files (the card, the scrubbed moeify.json): see `content`
    content: bytes | None = None


@dataclass
class PushPlan:
    """Everything a push will send, decided before any network call (what --dry-run prints)."""

    folder: Path
    repo_id: str
    files: list[PushFile]
    card: str
    card_source: str  # "kept" (the folder's README.md), "generated" or "overwritten" (--overwrite-card)
    skipped: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    url: str
    commit_url: str | None
    pr_url: str | None
    uploaded_files: int
    total_bytes: int
    unchanged: bool


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        valid = bool(_REPO_ID.match(repo_id))
    except HFValidationError:
        valid = False
    if not valid:
        raise UsageError(f"{repo_id!r} is not a Hub repository id",
                         "use namespace/name, e.g. my-org/SmolLM2-135M-MoE-8x2-FP8")
    return repo_id


def validate_folder(folder: str | Path, reporter: Reporter = SILENT) -> tuple[list[PushFile], list[str]]:
    """The files to upload, after checking that `folder` is a complete, finished checkpoint.

    Checks: the folder is not a moeify temporary folder and no moeify run is writing it; config.json loads;
    the safetensors headers and index agree (every indexed shard exists, every file's size matches its
    header); no partial or temporary files; no safetensors file outside the index. Returns the files and
    the hidden entries skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder", "give the output folder of a moeify command")
    if folder.resolve().name.startswith(TMP_PREFIX):
        raise InputError(f"{folder}: is a moeify temporary folder (an unfinished or killed run)",
                         "push the finished output folder instead")
    pid = writer_pid(folder.resolve())
    if pid:
        raise InputError(f"{folder}: moeify run (pid {pid}) is still writing it", "wait for it to finish")
    config = load_json(folder / "config.json", "config.json")
    if not isinstance(config.get("model_type"), str):
        raise InputError(f"{folder / 'config.json'}: has no model_type", "is this a transformers checkpoint?")
    reader = CheckpointReader(folder)  # parses every header, checks sizes and the index
    check_checkpoint(reader, config)  # and config.json against the tensors
    weight_files = {info.file.name for info in reader.tensors.values()}
    total = reader.index_metadata.get("total_size") if isinstance(reader.index_metadata, dict) else None
    if isinstance(total, int) and total != reader.total_bytes():
        reporter.note(f"{INDEX_NAME} says total_size {total}, the shards hold {reader.total_bytes()} bytes")

    files: list[PushFile] = []
    skipped: list[str] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        name = rel.as_posix()
        parts = rel.parts
        partial = any(p.startswith(TMP_PREFIX) for p in parts)
        hidden = next((p for p in parts if p.startswith(".")), None)
        if hidden is not None and not partial:  # tool files (.git, .cache): their locks are not ours
            if hidden not in skipped:
                skipped.append(hidden)
            continue
        if partial or path.name.endswith(PARTIAL_SUFFIXES):
            raise InputError(f"{folder}: holds the partial file {name}",
                             "an unfinished or killed run left it; rerun that step or delete it")
        if path.is_dir():
            continue
        if not path.is_file():
            raise InputError(f"{folder}: {name} is not a regular file (a broken link?)", "fix or remove it")
        if path.suffix == ".safetensors" and len(parts) == 1 and path.name not in weight_files:
            raise InputError(f"{folder}: {name} is not named by {INDEX_NAME}",
                             "a leftover shard from another run? remove it")
        files.append(PushFile(name, path.stat().st_size, local=path))
    unexpected = [s for s in skipped if s not in SKIPPED_HIDDEN]
    if unexpected:
        reporter.note(f"not uploading hidden entries: {', '.join(unexpected)}")
    return files, skipped


def plan_push(folder: str | Path, repo_id: str, overwrite_card: bool = False,
              reporter: Reporter = SILENT) -> PushPlan:
    """Check the folder and decide the files and the card; touches no network."""
    from moeify.publish.card import build_card

    folder = Path(folder)
    check_repo_id(repo_id)
    files, skipped = validate_folder(folder, reporter)
    files = [_public_metadata(f) if f.path == METADATA_NAME else f for f in files]
    existing = next((f for f in files if f.path == CARD_NAME), None)
    text = existing.local.read_text(encoding="utf-8", errors="replace") if existing else ""  # type: ignore
    if text.strip() and not overwrite_card:
        return PushPlan(folder, repo_id, files, text, "kept", skipped)
    # An empty README.md is no card (e.g. a shell redirect created it before the dry run wrote): replace it.
    card = build_card(folder, repo_id)
    data = card.encode("utf-8")
    files = [f for f in files if f.path != CARD_NAME] + [PushFile(CARD_NAME, len(data), content=data)]
    files.sort(key=lambda f: f.path)
    return PushPlan(folder, repo_id, files, card, "overwritten" if text.strip() else "generated", skipped)


def _public_metadata(file: PushFile) -> PushFile:
    """The moeify.json to upload: the folder's record with local paths scrubbed (the local file is kept)."""
    from moeify.publish.card import public_record

    assert file.local is not None
    data = load_json(file.local, METADATA_NAME)
    content = (json.dumps(public_record(data), indent=2, default=str) + "\n").encode("utf-8")
    return PushFile(file.path, len(content), content=content)


def resolve_endpoint() -> str:
    """The Hub to talk to: HF_ENDPOINT (any Hub-compatible server) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def resolve_token(token: str | None) -> str:
    """--token, else HF_TOKEN, else the token saved by `hf auth login`; never printed."""
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise UsageError("no Hugging Face token: pushing needs one with write access",
                         "run `hf auth login`, set HF_TOKEN, or pass --token")
    return found


def push(plan: PushPlan, token: str | None = None, *, revision: str | None = None, create_pr: bool = False,
         private: bool = False, commit_message: str | None = None, reporter: Reporter = SILENT,
         progress: bool = False, retries: int = RETRIES, backoff: float | None = None) -> PushResult:
    """Create the repo if needed and commit the plan's files; transient failures are retried with backoff.

    `progress` shows huggingface_hub's upload bars on stderr (the CLI's human mode); otherwise it stays quiet.
    """
    from huggingface_hub import HfApi, constants

    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it cannot target another --revision",
                         "drop --revision, or push to the branch without --create-pr")
    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set, so nothing can be pushed", "unset HF_HUB_OFFLINE to push")
    secret = resolve_token(token)
    backoff = BACKOFF_SECONDS if backoff is None else backoff
    endpoint = resolve_endpoint()
    api = HfApi(endpoint=endpoint, token=secret)
    repo_id = plan.repo_id
    branch = revision or "main"
    message = commit_message or f"Upload {plan.folder.name} with moeify"
    try:
        with _quiet_hub(progress):
            info, before = _create_and_commit(api, plan, branch, create_pr, private, message, reporter,
                                              retries, backoff, endpoint)
    except Exception as e:  # noqa: BLE001 - every Hub failure becomes one line naming the cause
        raise _hub_error(e, repo_id, endpoint, secret) from e
    url = f"{endpoint}/{repo_id}" + ("" if branch == "main" or create_pr else f"/tree/{branch}")
    oid = getattr(info, "oid", None)
    return PushResult(url=url, commit_url=getattr(info, "commit_url", None),
                      pr_url=getattr(info, "pr_url", None), uploaded_files=len(plan.files),
                      total_bytes=plan.total_bytes,
                      unchanged=bool(before and oid == before and not create_pr))


def _create_and_commit(api, plan: PushPlan, branch: str, create_pr: bool, private: bool, message: str,
                       reporter: Reporter, retries: int, backoff: float, endpoint: str):
    """Create the repo (and branch) if missing, then commit; returns the commit info and the old head."""
    repo_id = plan.repo_id

    def create() -> None:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True, repo_type="model")

    def commit():
        # Fresh operations every attempt: huggingface_hub marks them as used once committed.
        return api.create_commit(repo_id, operations=_operations(plan), commit_message=message,
                                 revision=None if create_pr else branch, create_pr=create_pr,
                                 repo_type="model")

    reporter.status(f"creating {repo_id} on {endpoint} (if needed)")
    _retry(create, "create repository", retries, backoff, reporter)
    before = None if create_pr else _head_sha(api, repo_id, branch)
    reporter.status(f"uploading {len(plan.files)} files ({_human(plan.total_bytes)}) to {repo_id}; "
                    "files the Hub already holds are skipped")
    info = _retry(commit, "upload", retries, backoff, reporter)
    return info, before


@contextlib.contextmanager
def _quiet_hub(progress: bool) -> Iterator[None]:
    """Silence huggingface_hub's own warnings (we report ourselves) and, unless asked, its progress bars."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    bars_were_off = are_progress_bars_disabled()
    hub_logger.setLevel(logging.ERROR)
    if not progress:
        disable_progress_bars()
    try:
        yield
    finally:
        hub_logger.setLevel(level)
        if not progress and not bars_were_off:
            enable_progress_bars()


def _operations(plan: PushPlan) -> list:
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=f.path,
                               path_or_fileobj=f.content if f.local is None else str(f.local))
            for f in plan.files]


def _head_sha(api, repo_id: str, branch: str) -> str | None:
    """The branch's current commit, to tell afterwards whether the push changed anything."""
    try:
        return api.repo_info(repo_id, revision=branch, repo_type="model").sha
    except Exception:  # noqa: BLE001 - only informative; a missing branch simply has no head
        return None


def _retry(fn: Callable[[], T], what: str, retries: int, backoff: float, reporter: Reporter) -> T:
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not _is_transient(e):
                raise
            delay = backoff * 2**attempt
            reporter.note(f"{what} failed ({_reason(e)}); retry {attempt + 1}/{retries} in {delay:.3g}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def _causes(e: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return chain


def _status(e: BaseException) -> int | None:
    """The HTTP status of the Hub's answer, from huggingface_hub's typed error anywhere in the chain."""
    from huggingface_hub.errors import HfHubHTTPError

    for cause in _causes(e):
        code = getattr(cause.response, "status_code", None) if isinstance(cause, HfHubHTTPError) else None
        if isinstance(code, int):
            return code
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """The transport failures of the HTTP client huggingface_hub raises through (`errors.HTTPError`'s home).

    An httpx-family client (hub >= 1.0) has one `TransportError` base (connect, timeout, protocol);
    requests (hub < 1.0) has `ConnectionError` and `Timeout`. Plain socket errors count everywhere.
    """
    from huggingface_hub.errors import HTTPError

    client = importlib.import_module(HTTPError.__module__.split(".")[0])
    kinds = [getattr(client, "TransportError", None)] if hasattr(client, "TransportError") else [
        getattr(client, "ConnectionError", None), getattr(client, "Timeout", None)]
    return (ConnectionError, TimeoutError, *(k for k in kinds if isinstance(k, type)))


def _is_network(e: BaseException) -> bool:
    kinds = _network_errors()
    return any(isinstance(cause, kinds) for cause in _causes(e))


def _is_transient(e: BaseException) -> bool:
    status = _status(e)
    return status in TRANSIENT_STATUS if status is not None else _is_network(e)


def _reason(e: BaseException) -> str:
    status = _status(e)
    return f"HTTP {status}" if status is not None else type(e).__name__


def _server_message(e: BaseException) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    for cause in _causes(e):
        text = cause.server_message if isinstance(cause, HfHubHTTPError) else None
        if text:
            return " ".join(str(text).split())[:200]
    return ""


def _hub_error(e: BaseException, repo_id: str, endpoint: str, secret: str) -> Exception:
    """One line per failure, naming what to do; the token is scrubbed from anything echoed."""
    from moeify.errors import MoeifyError

    if isinstance(e, MoeifyError):
        return e
    status = _status(e)
    detail = _server_message(e).replace(secret, "***")
    suffix = f": {detail}" if detail else ""
    namespace = repo_id.split("/")[0]
    if status == 401:
        return HubError(f"the Hub rejected the token (HTTP 401){suffix}",
                        "check it with `hf auth whoami`, or log in again with `hf auth login`")
    if status == 403:
        return HubError(f"the token may not write to {repo_id} (HTTP 403){suffix}",
                        f"use a token with write access to {namespace!r}")
    if status == 404:
        return HubError(f"{repo_id} or its namespace {namespace!r} was not found (HTTP 404){suffix}",
                        "check the namespace (your user or an organisation you belong to) and --revision")
    if status == 409:
        return HubError(f"the Hub reported a conflict on {repo_id} (HTTP 409){suffix}",
                        "another upload or branch change is in progress; run the push again")
    if status == 400 or status == 422:
        return HubError(f"the Hub refused the upload (HTTP {status}){suffix}",
                        "check the model card metadata")
    if status is not None and (status >= 500 or status in TRANSIENT_STATUS):
        return HubError(f"the Hub failed with HTTP {status} after retries{suffix}",
                        "try again later; a new push resumes where this one stopped")
    if _is_network(e):
        return HubError(f"cannot reach {endpoint} ({type(_causes(e)[-1]).__name__})",
                        "check the network or HF_ENDPOINT; a new push resumes where this one stopped")
    if isinstance(e, ValueError) and "README.md" in str(e):
        return HubError("the Hub rejected the model card metadata", "fix README.md or pass --overwrite-card")
    text = " ".join(str(e).split())[:200].replace(secret, "***")
    return HubError(f"push failed: {type(e).__name__}: {text}", "rerun with MOEIFY_DEBUG=1 for details")


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def human_size(n: int) -> str:
    return _human(n)


def describe_plan(plan: PushPlan) -> dict[str, Any]:
    return {"repo_id": plan.repo_id, "folder": str(plan.folder), "card": plan.card_source,
            "files": [{"path": f.path, "size": f.size} for f in plan.files], "total_bytes": plan.total_bytes}
