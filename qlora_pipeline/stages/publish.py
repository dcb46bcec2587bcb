"""Publish: upload a merged export, a GGUF folder (export-gguf) or, with adapter_only, a LoRA adapter to the Hub.

Everything is checked offline first, so a bad folder never reaches the network: the folder is complete for its
kind, its weights are safetensors only (pickles — .bin, .pt, .pkl… — are refused), its model card is valid (see
`card.check_card`), the repo id is `OWNER/NAME`, and no file holds a credential. Then the repo is created (or
found), the branch too with a revision, and the folder is uploaded in one commit.

The token comes from HF_TOKEN or the saved login (`hf auth login`) through huggingface_hub itself: it is never
passed, printed or written here, and any message that could hold it is scrubbed. Publishing reads the folder and
never changes it, so after a failure (offline, refused token, quota) the same command simply publishes again.
"""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

from qlora_pipeline.errors import PipelineError, PublishError, first_line, one_line
from qlora_pipeline.model.adapters import saved_merge_output_dir
from qlora_pipeline.secrets import machine_secrets, redact

# Files that are pickles (they run code when loaded): an export holds safetensors only.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Hidden files and folders (.git, .cache, editor files) are neither checked nor uploaded.
HIDDEN_PATTERNS = [".*", "*/.*"]
TOKENIZER_MODELS = ("tokenizer.json", "tokenizer.model")
GGUF_MAGIC = b"GGUF"
KIND_NAMES = {"merged": "merged model", "adapter": "LoRA adapter", "gguf": "GGUF files"}
CARD_LIBRARY = {"merged": "transformers", "adapter": "peft", "gguf": "gguf"}
NETWORK_ERROR_NAMES = {
    "TransportError",
    "NetworkError",
    "ConnectError",
    "TimeoutException",
    "ProxyError",
    "RemoteProtocolError",
}


def publish(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    adapter_only: bool = False,
    dry_run: bool = False,
) -> dict:
    """Check `folder` and upload it to `repo_id` (unless dry_run). Returns what was (or would be) published.

    `folder`: a merged export, a LoRA adapter folder (adapter_only), or a run folder (its merged/ export, or its
    adapter/ with adapter_only). Raises PipelineError for a bad folder or repo id (nothing sent), PublishError when
    the Hub cannot be reached or refuses the upload (the folder is untouched either way).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PipelineError("publish: --revision is empty; name a branch or leave it out for main")
    target, kind = resolve_folder(folder, adapter_only)
    files = check_folder(target, kind)
    notes = folder_notes(target, kind)
    total = sum(size for _, size in files)
    result = {
        "folder": str(target),
        "kind": kind,
        "repo_id": repo_id,
        "revision": revision,
        "private": private,
        "files": [{"path": name, "bytes": size} for name, size in files],
        "total_bytes": total,
        "notes": notes,
        "dry_run": dry_run,
        "url": None,
        "commit_url": None,
    }

    print(f"{'publish (dry run)' if dry_run else 'publish'}: {KIND_NAMES[kind]} in {target}")
    width = max(len(name) for name, _ in files)
    for name, size in files:
        print(f"  {name:<{width}}  {human_size(size):>10}")
    print(f"  {len(files)} files, {human_size(total)} in all")
    print("model card: valid")
    print(f"target: {repo_id} (revision {revision or 'main'}, {'private' if private else 'public'})")
    for note in notes:
        print(f"note: {note}")

    if dry_run:
        from huggingface_hub import get_token

        if get_token():
            print("token: found (HF_TOKEN or the saved login)")
        else:
            print("token: none found; set HF_TOKEN or run `hf auth login` before publishing")
        print("dry run: nothing was sent to the Hub")
        return result

    url, commit_url = _upload(target, kind, repo_id, private, revision)
    result["url"], result["commit_url"] = url, commit_url
    print(f"published: {url}" + (f" (commit {commit_url})" if commit_url else ""))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Offline checks


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = " ".join(str(exc).split())
        raise PipelineError(f"publish: --repo-id {repo_id!r} is not a valid repo id (OWNER/NAME): {reason}") from None
    if "/" not in repo_id:
        raise PipelineError(f"publish: --repo-id {repo_id!r} needs an owner: OWNER/NAME (a user or an organization)")


def resolve_folder(folder: Path, adapter_only: bool) -> tuple[Path, str]:
    """The folder to upload and its kind ("merged", "gguf" or "adapter") for DIR as given on the command line."""
    if not folder.exists():
        raise PipelineError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise PipelineError(f"{folder}: not a folder; publish takes a merged export, an adapter or a run folder")
    is_run = (folder / "adapter").is_dir() or (folder / "summary.json").is_file() or (folder / "recipe.yaml").is_file()
    if adapter_only:
        if (folder / "adapter_config.json").is_file():
            return folder, "adapter"
        if is_run and (folder / "adapter").is_dir():
            return folder / "adapter", "adapter"
        raise PipelineError(
            f"{folder}: --adapter-only needs a LoRA adapter folder (with adapter_config.json) or a run folder "
            "holding adapter/; this is neither"
        )
    if (folder / "config.json").is_file():
        return folder, "merged"
    if any(folder.glob("*.gguf")):
        return folder, "gguf"
    if (folder / "adapter_config.json").is_file():
        raise PipelineError(
            f"{folder}: this is a LoRA adapter, not a merged export; pass --adapter-only to publish the adapter, "
            "or publish the export of `qlora-pipeline merge RUN_DIR`"
        )
    if is_run:
        merged = _merged_folder_of_run(folder)
        if (merged / "config.json").is_file():
            return merged, "merged"
        raise PipelineError(
            f"{folder}: this run folder has no merged export ({merged.name}/); run `qlora-pipeline merge {folder}` "
            "first, or pass --adapter-only to publish the LoRA adapter"
        )
    raise PipelineError(
        f"{folder}: not a merged export (no config.json), a LoRA adapter (no adapter_config.json) or a run folder"
    )


def _merged_folder_of_run(run: Path) -> Path:
    """run/merged, or the recipe's merge_output_dir when the saved recipe names one that exists."""
    configured = saved_merge_output_dir(run)
    return configured if configured is not None and configured.is_dir() else run / "merged"


def list_files(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file that would be uploaded, hidden files and folders left out."""
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        files.append((relative.as_posix(), path.stat().st_size))
    return files


def check_folder(folder: Path, kind: str) -> list[tuple[str, int]]:
    """Raise PipelineError for the first problem that should stop a publish; return the files to upload."""
    from qlora_pipeline.outputs.card_check import check_card

    files = list_files(folder)
    names = {name for name, _ in files}
    for name, _ in files:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise PipelineError(
                f"{folder / name}: a pickle file ({Path(name).suffix}), which runs code when loaded; publish "
                "uploads safetensors only: remove it from the folder or export again"
            )

    if kind == "merged":
        _require_json(folder, "config.json", "a merged export needs the model's config.json")
        if "model.safetensors.index.json" in names:
            index = _require_json(folder, "model.safetensors.index.json", "")
            shards = sorted(set((index.get("weight_map") or {}).values()))
            if not shards:
                raise PipelineError(f"{folder / 'model.safetensors.index.json'}: the index lists no weight shards")
            for shard in shards:
                if shard not in names:
                    raise PipelineError(f"{folder / shard}: missing, but model.safetensors.index.json lists it")
        elif "model.safetensors" not in names:
            raise PipelineError(
                f"{folder}: no model weights (model.safetensors, or model.safetensors.index.json and its shards)"
            )
        if "tokenizer_config.json" not in names or not names.intersection(TOKENIZER_MODELS):
            raise PipelineError(
                f"{folder}: no tokenizer (tokenizer_config.json and tokenizer.json or tokenizer.model); the export "
                "must carry the tokenizer and chat template it was trained with"
            )
        _require_json(folder, "tokenizer_config.json", "")
    elif kind == "gguf":
        for name in sorted(n for n in names if n.endswith(".gguf")):
            with open(folder / name, "rb") as handle:
                if handle.read(4) != GGUF_MAGIC:
                    raise PipelineError(f"{folder / name}: not a GGUF file (no GGUF magic); export it again")
    else:
        _require_json(folder, "adapter_config.json", "a LoRA adapter needs its adapter_config.json")
        if "adapter_model.safetensors" not in names:
            raise PipelineError(f"{folder}: no adapter weights (adapter_model.safetensors)")
    for name in sorted(names):
        if name.endswith(".safetensors"):
            _check_safetensors(folder / name)

    problems = check_card(folder)
    if problems:
        more = f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})" if len(problems) > 1 else ""
        raise PipelineError(problems[0] + more)
    expected = CARD_LIBRARY[kind]
    library = _card_library(folder)
    if library != expected:
        raise PipelineError(
            f"{folder / 'README.md'}: the model card says library_name {library!r}, but this folder holds "
            f"{KIND_NAMES[kind]} (library_name {expected!r})"
        )

    secrets = machine_secrets()
    if secrets:
        for name, _ in files:
            found = _file_holds(folder / name, secrets)
            if found:
                raise PipelineError(
                    f"{folder / name}: holds the value of {found}; a credential must never be published: "
                    "remove it from the file"
                )
    return files


def _require_json(folder: Path, name: str, why: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise PipelineError(f"{path}: missing; {why}" if why else f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PipelineError(f"{path}: not a JSON object")
    return value


def _check_safetensors(path: Path) -> None:
    """A truncated or foreign file fails here, offline, rather than on the Hub or at someone's load time."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError("header longer than the file")
            json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError, OSError) as exc:
        raise PipelineError(f"{path}: not a valid safetensors file ({exc}); export it again") from None


def _card_library(folder: Path) -> str | None:
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md").data.get("library_name")


def _file_holds(path: Path, secrets: dict[str, str]) -> str | None:
    """The name of the first secret whose value occurs in the file (a safetensors file: in its header)."""
    needles = {name: value.encode() for name, value in secrets.items()}
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = handle.read(length)
        return next((name for name, needle in needles.items() if needle in header), None)
    overlap = max(len(n) for n in needles.values())
    tail = b""
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 23):
            window = tail + chunk
            for name, needle in needles.items():
                if needle in window:
                    return name
            tail = window[-overlap:]
    return None


def folder_notes(folder: Path, kind: str) -> list[str]:
    """Things worth knowing that do not stop a publish."""
    notes = []
    if kind in ("merged", "gguf") and not (folder / "fidelity.json").is_file():
        notes.append("no fidelity.json: the fidelity check is not part of this export")
    if kind == "gguf" and not (folder / "Modelfile").is_file():
        notes.append("no Modelfile: Ollama users write their own TEMPLATE")
    if kind == "adapter":
        try:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        base = config.get("base_model_name_or_path")
        if isinstance(base, str) and (base.startswith(("/", "\\")) or re.match(r"[A-Za-z]:\\", base)):
            name = re.split(r"[\\/]", base.rstrip("/\\"))[-1]
            notes.append(
                f"adapter_config.json names a local base model (…/{name}) as base_model_name_or_path: "
                "AutoPeftModelForCausalLM will not find it on another machine"
            )
    return notes


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


# ---------------------------------------------------------------------------------------------------------------
# Upload


def _upload(folder: Path, kind: str, repo_id: str, private: bool, revision: str | None) -> tuple[str, str | None]:
    from huggingface_hub import HfApi, constants, get_token

    untouched = f"the export in {folder} is untouched"
    if constants.is_offline_mode():
        raise PublishError(
            "publish: cannot reach the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1); set "
            f"HF_HUB_OFFLINE=0 and rerun this command to publish; {untouched}"
        )
    if not get_token():
        raise PublishError(
            f"publish: no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); "
            f"{untouched}"
        )
    what = KIND_NAMES[kind]
    api = HfApi()  # the token comes from HF_TOKEN or the saved login; never passed or printed here
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            revision=revision,
            commit_message=f"Upload {what} (qlora-pipeline)",
            ignore_patterns=HIDDEN_PATTERNS,
        )
    except Exception as exc:  # noqa: BLE001 -- every failure becomes one explained line
        raise PublishError(redact(explain_hub_error(exc, folder, repo_id, revision), machine_secrets())) from None
    return str(url), getattr(commit, "commit_url", None)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & NETWORK_ERROR_NAMES) or isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror))


def explain_hub_error(exc: Exception, folder: Path, repo_id: str, revision: str | None) -> str:
    """One line saying why the Hub call failed and what to do, for every failure publish can meet."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    untouched = f"the export in {folder} is untouched, rerun this command to publish"
    errors = list(_chain(exc))
    http = next((e for e in errors if isinstance(e, HfHubHTTPError)), None)
    if any(isinstance(e, OfflineModeIsEnabled) for e in errors):
        return (
            "publish: cannot reach the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1); set "
            f"HF_HUB_OFFLINE=0; {untouched}"
        )
    if any(isinstance(e, LocalTokenNotFoundError) for e in errors):
        return f"publish: no Hugging Face token: set HF_TOKEN or run `hf auth login`; {untouched}"
    if http is not None:
        response = getattr(http, "response", None)
        status = getattr(response, "status_code", None)
        server = one_line(getattr(http, "server_message", None) or "", 160)
        said = f": {server}" if server else ""
        branch = f" (branch {revision})" if revision else ""
        if status == 401:
            return (
                f"publish: the Hub refused the token (401 Unauthorized{said}): set HF_TOKEN to a valid token with "
                f"write access or run `hf auth login`; {untouched}"
            )
        if status == 403:
            return (
                f"publish: the token may not write to {repo_id} (403 Forbidden{said}): use a token with write "
                f"access to that namespace (a fine-grained token needs write permission there); {untouched}"
            )
        if status == 404:
            return (
                f"publish: the Hub found no {repo_id}{branch} (404 Not Found{said}): check the owner is your user "
                f"name or an organization you can write to; {untouched}"
            )
        if status in (402, 413) or re.search(r"quota|storage limit|too large", server, re.IGNORECASE):
            return (
                f"publish: the Hub refused the upload as too large or over the storage quota ({status}{said}): "
                f"free space or raise the quota; {untouched}"
            )
        if status == 429:
            return f"publish: the Hub is rate-limiting this account (429{said}): wait a few minutes; {untouched}"
        if status is not None and status >= 500:
            return f"publish: the Hub failed with a server error ({status}{said}); {untouched}"
        reason = server or one_line(first_line(http))
        return f"publish: the Hub answered HTTP {status}: {reason}; {untouched}"
    network = next((e for e in errors if _is_network_error(e)), None)
    if network is not None:
        detail = one_line(str(network) or type(network).__name__, 160)
        return (
            f"publish: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(network).__name__}: "
            f"{detail}); {untouched}"
        )
    detail = one_line(str(exc) or type(exc).__name__, 200)
    return f"publish: uploading to {repo_id} failed ({type(exc).__name__}: {detail}); {untouched}"
