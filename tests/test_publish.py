"""Model cards and `qlora-pipeline publish`: cards that are valid and leak nothing, offline checks that stop a bad
folder before any network, and clean one-line errors (exit 3, folder untouched) when the Hub cannot be reached or
refuses the token. The Hub is never mocked: offline mode, a closed port and a local HTTP server stand in for it."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_cli, write_recipe
from huggingface_hub import ModelCard

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.model.loading import resolve_model_path
from qlora_pipeline.outputs.card import base_license, build_card
from qlora_pipeline.outputs.card_check import check_card
from qlora_pipeline.outputs.names import ABSOLUTE_PATH
from qlora_pipeline.recipe import load_recipe
from qlora_pipeline.stages.publish import publish

pytestmark = pytest.mark.slow

SECRETS = {"HF_TOKEN": "hf_SENTINEL_publish_token", "WANDB_API_KEY": "wandb_SENTINEL_key"}
FIDELITY = {
    "base_mode": "nf4-roundtrip",
    "dtype": "fp32",
    "reference": "4-bit base + adapter, as trained",
    "prompts": 8,
    "max_abs_logit_diff": 1.2e-5,
    "mean_abs_logit_diff": 2.0e-6,
    "perplexity_reference": 12.3456,
    "perplexity_merged": 12.3467,
    "perplexity_increase": 0.0001,
    "greedy_identical": 8,
    "thresholds": {"max_ppl_increase": 0.02, "max_logit_diff": None},
    "passed": True,
    "examples": [
        {
            "prompt": "<s>GPT4 Correct User: Which gene? | BRCA1<|end_of_turn|>GPT4 Correct Assistant:",
            "reference_generation": "BRCA1 is the gene " + "and more " * 60,
            "merged_generation": "BRCA1 is the gene\nnamed",
            "max_abs_logit_diff": 1.1e-5,
        },
        {"prompt": "second prompt", "reference_generation": "ref two", "merged_generation": "merged two"},
        {"prompt": "third prompt", "reference_generation": "ref three", "merged_generation": "merged three"},
        {"prompt": "fourth prompt", "reference_generation": "ref four", "merged_generation": "merged four"},
    ],
}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, embedded_cache) -> Path:
    """One tiny run (3 steps) with credentials in the environment, its adapter carrying our model card."""
    root = tmp_path_factory.mktemp("publish")
    recipe = write_recipe(root / "recipe.yaml", output_dir=str(root / "run"))
    result = run_cli(
        "train", str(recipe), "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no", env=SECRETS
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "run"
    # train.py replaced TRL's README.md with our card.
    assert "qlora-pipeline" in (run / "adapter" / "README.md").read_text()
    return run


@pytest.fixture(scope="module")
def recipe(trained_run):
    return load_recipe(trained_run / "recipe.yaml")


@pytest.fixture
def secrets_in_env(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _copy_adapter(run: Path, target: Path) -> Path:
    shutil.copytree(run / "adapter", target)
    return target


def _assert_no_leak(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text


# ---------------------------------------------------------------------------------------------------------------
# Cards


def test_embedded_tiny_model_has_an_apache_card(recipe):
    folder = Path(resolve_model_path("embedded:tiny-starling"))
    card = ModelCard.load(folder / "README.md")
    assert card.data.license == "apache-2.0"
    assert base_license(recipe) == "apache-2.0"


def test_adapter_card_front_matter_and_body(trained_run, recipe):
    readme = trained_run / "adapter" / "README.md"
    card = ModelCard.load(readme)
    data = card.data.to_dict()
    assert data["library_name"] == "peft" and data["pipeline_tag"] == "text-generation"
    assert {"qlora-pipeline", "lora", "qlora", "sft", "trl"} <= set(data["tags"])
    assert data["license"] == "apache-2.0", "read from the embedded tiny model's own card"
    assert "base_model" not in data and "datasets" not in data, "embedded names are not Hub ids"

    text = readme.read_text()
    assert "| lora_r | 8 |" in text and "| lora_alpha | 16 |" in text
    assert "| learning_rate | 0.01 |" in text and "| max_steps | 3 |" in text
    assert "| load_in_4bit | yes |" in text and "| bnb_4bit_quant_type | nf4 |" in text
    assert "GPT4 Correct User:" in text and "GPT4 Correct Assistant:" in text and "<|end_of_turn|>" in text
    assert "AutoPeftModelForCausalLM.from_pretrained" in text and "PeftModel.from_pretrained" in text
    assert "OWNER/NAME" in text
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"| optimizer steps | {summary['global_step']} |" in text
    assert f"{summary['eval_loss_after']:.4f}" in text, "eval loss after training is shown"
    assert f"| train | {summary['data']['train']['rows']} |" in text
    assert str(trained_run.parent) not in text and not ABSOLUTE_PATH.search(text)
    _assert_no_leak(text)
    assert check_card(trained_run / "adapter") == []


def test_merged_card_shows_the_fidelity_figures(trained_run, recipe, tmp_path):
    summary = json.loads((trained_run / "summary.json").read_text())
    card = build_card("merged", recipe, summary, FIDELITY, repo_id="me/tiny-merged")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags
    text = str(card)
    assert "## Merge fidelity" in text and "nf4-roundtrip" in text
    assert "1.2e-05" in text and "12.35" in text and "0.010%" in text and "8 of 8" in text
    assert "BRCA1 is the gene" in text and "merged three" in text
    assert "fourth prompt" not in text, "three examples at most"
    assert "and more " * 30 not in text, "long generations are cut"
    assert "&lt;\\|end_of_turn\\|&gt;" in text, "table cells are escaped"
    assert 'repo = "me/tiny-merged"' in text and "AutoModelForCausalLM.from_pretrained(repo" in text
    assert "apply_chat_template" in text and "add_generation_prompt=True" in text
    card.save(tmp_path / "README.md")
    assert check_card(tmp_path) == []


def test_card_of_a_hub_base_names_it(recipe, tmp_path):
    hub = load_recipe(
        write_recipe(
            tmp_path / "recipe.yaml",
            model_name_or_path="qlora-pipeline-tests/no-such-model",
            dataset_name="qlora-pipeline-tests/no-such-data",
            output_dir=str(tmp_path / "run"),
        )
    )
    assert base_license(hub) is None, "offline: no license, no error"
    card = build_card("adapter", hub, None, None, repo_id="me/adapter")
    assert card.data.base_model == "qlora-pipeline-tests/no-such-model"
    assert card.data.datasets == ["qlora-pipeline-tests/no-such-data"]
    assert card.data.license is None
    assert '"qlora-pipeline-tests/no-such-model", quantization_config=quantization' in str(card)
    hub.export.hub_license = "mit"
    assert build_card("merged", hub, None, None).data.license == "mit", "hub_license wins"


def test_card_scrubs_secrets_and_local_paths(recipe, secrets_in_env, tmp_path):
    leaky = load_recipe(
        write_recipe(
            tmp_path / "recipe.yaml", output_dir=str(tmp_path / "run"), dataset_name="embedded:medtuned-sample"
        )
    )
    leaky.data.dataset_name = f"/home/alice/{SECRETS['HF_TOKEN']}/rows.jsonl"
    leaky.data.eval_file = "/home/alice/private/eval.jsonl"
    text = str(build_card("adapter", leaky, None, None))
    _assert_no_leak(text)
    assert "/home/alice" not in text and str(tmp_path) not in text
    assert "rows.jsonl" in text and "eval.jsonl" in text, "local files are named by their last part"


def test_absolute_path_pattern():
    for text in ("/home/u/models/x", "see /tmp/run/adapter here", "C:\\Users\\me\\model", "(/work/main/runs)"):
        assert ABSOLUTE_PATH.search(text), text
    innocuous = (
        "tokens/s",
        "`</s>` and <|end_of_turn|>",
        "https://huggingface.co/docs/hub",
        'repo = "OWNER/NAME"',
        "`mean`/`max`",
        "./relative/path and ~/home/path",
        "train/eval rows, 1/2/3",
    )
    for text in innocuous:
        assert not ABSOLUTE_PATH.search(text), text


def _write_readme(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(text)
    return folder


def test_check_card_reports_problems(tmp_path, secrets_in_env):
    good = "---\nlibrary_name: peft\npipeline_tag: text-generation\n---\n\n# ok\n"
    assert check_card(_write_readme(tmp_path / "good", good)) == []
    (missing := tmp_path / "missing").mkdir()
    assert "no model card" in check_card(missing)[0]
    broken = check_card(_write_readme(tmp_path / "broken", "---\nlicense: [apache\n---\n\n# x\n"))
    assert len(broken) == 1 and "front matter is not valid YAML" in broken[0]
    assert "no YAML front matter" in check_card(_write_readme(tmp_path / "bare", "# just text\n"))[0]
    fields = check_card(_write_readme(tmp_path / "fields", "---\nlicense: mit\n---\n\n# x\n"))
    assert any("library_name" in p for p in fields) and any("pipeline_tag" in p for p in fields)
    local_base = check_card(_write_readme(tmp_path / "base", good.replace("---\n\n", "base_model: /tmp/x/y\n---\n\n")))
    assert any("base_model" in p and "not a Hub repo id" in p for p in local_base)
    path = check_card(_write_readme(tmp_path / "path", good + "\nTrained in /home/alice/runs/demo.\n"))
    assert len(path) == 1 and "absolute local path" in path[0] and "line 8" in path[0]
    secret = check_card(_write_readme(tmp_path / "secret", good + f"\ntoken {SECRETS['WANDB_API_KEY']}\n"))
    assert len(secret) == 1 and "WANDB_API_KEY" in secret[0]
    _assert_no_leak(secret[0])


# ---------------------------------------------------------------------------------------------------------------
# publish: offline checks and dry run


def test_dry_run_lists_every_file(trained_run):
    before = _snapshot(trained_run)
    result = run_cli("publish", str(trained_run), "--adapter-only", "--repo-id", "me/tiny", "--dry-run", env=SECRETS)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    names = sorted(p.name for p in (trained_run / "adapter").iterdir() if p.is_file())
    assert "adapter_model.safetensors" in names and "README.md" in names
    for name in names:
        assert name in result.stdout, name
    assert f"{len(names)} files" in result.stdout and " in all" in result.stdout
    assert "model card: valid" in result.stdout and "me/tiny (revision main, public)" in result.stdout
    assert "KiB" in result.stdout or "MiB" in result.stdout
    assert "nothing was sent" in result.stdout
    _assert_no_leak(result.stdout + result.stderr)
    assert _snapshot(trained_run) == before


def test_publish_function_dry_run(trained_run, capsys):
    result = publish(trained_run, "me/tiny", adapter_only=True, dry_run=True, revision="v1", private=True)
    assert result["kind"] == "adapter" and result["dry_run"] and result["url"] is None
    files = {f["path"]: f["bytes"] for f in result["files"]}
    adapter = trained_run / "adapter"
    assert files == {p.name: p.stat().st_size for p in adapter.iterdir() if p.is_file()}
    assert result["total_bytes"] == sum(files.values())
    assert "revision v1, private" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="no merged export"):
        publish(trained_run, "me/tiny", dry_run=True)


def test_dry_run_of_a_merged_export(trained_run, recipe, tmp_path):
    """A run folder given without --adapter-only publishes its merged/ export."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / "recipe.yaml", run / "recipe.yaml")
    shutil.copy(trained_run / "summary.json", run / "summary.json")
    merged = run / "merged"
    shutil.copytree(resolve_model_path("embedded:tiny-starling"), merged)  # stands in for a merged model
    build_card("merged", recipe, None, FIDELITY).save(merged / "README.md")
    (merged / "fidelity.json").write_text(json.dumps(FIDELITY))
    result = run_cli("publish", str(run), "--repo-id", "me/tiny-merged", "--dry-run")
    assert result.returncode == 0, result.stderr
    for name in ("config.json", "model.safetensors", "tokenizer_config.json", "fidelity.json", "README.md"):
        assert name in result.stdout, name
    assert "merged model" in result.stdout and "model card: valid" in result.stdout

    (merged / "fidelity.json").unlink()
    (merged / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert_clean_error(run_cli("publish", str(run), "--repo-id", "me/x", "--dry-run"), "not a valid safetensors")
    (merged / "model.safetensors").unlink()
    assert_clean_error(run_cli("publish", str(run), "--repo-id", "me/x", "--dry-run"), "no model weights")


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing folder", ["no such folder"]),
        ("pickle", ["pytorch_model.bin", "pickle", "safetensors only"]),
        ("invalid repo id", ["not a valid repo id", "OWNER/NAME"]),
        ("repo id without owner", ["needs an owner"]),
        ("broken front matter", ["README.md", "front matter"]),
        ("absolute path in card", ["README.md", "absolute local path"]),
        ("no weights", ["adapter_model.safetensors"]),
        ("secret in a file", ["notes.txt", "HF_TOKEN", "credential"]),
        ("run without merged export", ["qlora-pipeline merge", "--adapter-only"]),
        ("adapter without --adapter-only", ["LoRA adapter", "--adapter-only"]),
        ("unknown option", ["unknown option", "--public"]),
    ],
)
def test_bad_input_is_stopped_before_any_network(trained_run, tmp_path, case, fragments):
    folder = _copy_adapter(trained_run, tmp_path / "adapter")
    args = ["--adapter-only", "--repo-id", "me/tiny"]
    if case == "missing folder":
        folder = tmp_path / "nope"
    elif case == "pickle":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    elif case == "invalid repo id":
        args[-1] = "me/tiny//bad name"
    elif case == "repo id without owner":
        args[-1] = "tiny"
    elif case == "broken front matter":
        (folder / "README.md").write_text("---\nlibrary_name: [peft\n---\n\n# x\n")
    elif case == "absolute path in card":
        with open(folder / "README.md", "a") as handle:
            handle.write("\nTrained in /home/alice/runs/demo.\n")
    elif case == "no weights":
        (folder / "adapter_model.safetensors").unlink()
    elif case == "secret in a file":
        (folder / "notes.txt").write_text(f"token={SECRETS['HF_TOKEN']}\n")
    elif case == "run without merged export":
        folder, args = trained_run, args[1:]
    elif case == "adapter without --adapter-only":
        args = args[1:]
    elif case == "unknown option":
        args.append("--public")
    before = _snapshot(folder) if folder.exists() else None
    # HF_HUB_OFFLINE=0 and an endpoint that answers nothing: had any request been made, the error would say so.
    env = _online(f"http://127.0.0.1:{_closed_port()}", tmp_path)
    result = run_cli("publish", str(folder), *args, env=env)
    line = assert_clean_error(result, *fragments)
    assert result.returncode == 2 and "cannot reach" not in line
    _assert_no_leak(result.stdout + result.stderr)
    if before is not None:
        assert _snapshot(folder) == before


# ---------------------------------------------------------------------------------------------------------------
# publish: the Hub cannot be reached or says no


def _online(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """Environment of a publish that goes online, to `endpoint`, with its own HF_HOME (huggingface_hub caches there)."""
    return {**SECRETS, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home")}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class _LocalHub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the Hub's HTTP API on 127.0.0.1. With status 200 it accepts a repo, a branch and one commit of
    small ("regular") files, recording what was committed; with any other status it answers every request with it."""

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path = self.path.split("?")[0]
        self.server.seen.append((self.command, path, self.headers.get("Authorization", "")))
        endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        if self.server.status != 200:
            status, answer = self.server.status, {"error": "Invalid credentials in Authorization header"}
        elif path == "/api/repos/create":
            status, answer = 200, {"url": f"{endpoint}/me/tiny", "name": "me/tiny"}
        elif "/preupload/" in path:
            files = json.loads(body)["files"]
            status, answer = (
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        elif "/commit/" in path:
            for line in body.decode().splitlines():
                record = json.loads(line)
                if record["key"] == "file":
                    self.server.committed[record["value"]["path"]] = base64.b64decode(record["value"]["content"])
            status, answer = 200, {"commitOid": "c" * 40, "commitUrl": f"{endpoint}/me/tiny/commit/{'c' * 40}"}
        else:
            status, answer = 200, {}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub():
    servers = []

    def start(status: int):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LocalHub)
        server.status, server.seen, server.committed = status, [], {}
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_offline_mode_is_a_clean_error(trained_run):
    before = _snapshot(trained_run)
    result = run_cli(
        "publish", str(trained_run), "--adapter-only", "--repo-id", "me/tiny", env={**SECRETS, "HF_HUB_OFFLINE": "1"}
    )
    assert_clean_error(result, "cannot reach the Hugging Face Hub", "HF_HUB_OFFLINE", "untouched")
    assert result.returncode == 3
    _assert_no_leak(result.stdout + result.stderr)
    assert _snapshot(trained_run) == before


def test_unreachable_hub_is_a_clean_error(trained_run, tmp_path):
    before = _snapshot(trained_run)
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    env = _online(endpoint, tmp_path)
    result = run_cli("publish", str(trained_run), "--adapter-only", "--repo-id", "me/tiny", env=env)
    assert_clean_error(result, "cannot reach the Hugging Face Hub", endpoint, "Connection refused", "rerun")
    assert result.returncode == 3
    _assert_no_leak(result.stdout + result.stderr)
    assert _snapshot(trained_run) == before


def test_no_token_is_a_clean_error(trained_run, tmp_path):
    env = _online(f"http://127.0.0.1:{_closed_port()}", tmp_path)
    env.update({"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": ""})  # and HF_HOME holds no saved login
    result = run_cli("publish", str(trained_run), "--adapter-only", "--repo-id", "me/tiny", env=env)
    assert_clean_error(result, "no Hugging Face token", "HF_TOKEN", "hf auth login")
    assert result.returncode == 3


@pytest.mark.parametrize(
    ("status", "fragments"),
    [(401, ["401", "refused the token", "HF_TOKEN", "hf auth login"]), (403, ["403", "may not write to me/tiny"])],
)
def test_refused_token_is_a_clean_error(trained_run, local_hub, tmp_path, status, fragments):
    server, endpoint = local_hub(status)
    before = _snapshot(trained_run)
    env = _online(endpoint, tmp_path)
    result = run_cli("publish", str(trained_run), "--adapter-only", "--repo-id", "me/tiny", "--revision", "v1", env=env)
    assert_clean_error(result, *fragments, "untouched")
    assert result.returncode == 3
    _assert_no_leak(result.stdout + result.stderr)
    assert ("POST", "/api/repos/create", f"Bearer {SECRETS['HF_TOKEN']}") in server.seen, server.seen
    assert _snapshot(trained_run) == before


def test_publish_uploads_the_folder_in_one_commit(trained_run, local_hub, tmp_path):
    """The whole path through huggingface_hub against a local stand-in for the Hub; run twice, as after a failure."""
    folder = _copy_adapter(trained_run, tmp_path / "adapter")
    (folder / ".notes.swp").write_text("editor file")  # hidden files are not published
    before = _snapshot(folder)
    server, endpoint = local_hub(200)
    env = _online(endpoint, tmp_path)
    for _ in range(2):
        server.committed.clear()
        result = run_cli("publish", str(folder), "--adapter-only", "--repo-id", "me/tiny", "--revision", "v1", env=env)
        assert result.returncode == 0, result.stderr
        assert f"published: {endpoint}/me/tiny" in result.stdout
        expected = {name: (folder / name).read_bytes() for name in before if not name.startswith(".")}
        assert server.committed == expected, sorted(server.committed)
        _assert_no_leak(result.stdout + result.stderr)
    paths = [path for _, path, _ in server.seen]
    assert "/api/models/me/tiny/branch/v1" in paths and "/api/models/me/tiny/commit/v1" in paths
    assert _snapshot(folder) == before
