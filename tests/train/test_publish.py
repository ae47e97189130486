"""`python -m train push` against `FakeHubServer`, a Hub-protocol test double on 127.0.0.1 (tests/hub_server.py).

Pushes and loads run in fresh subprocesses, each with its own `HF_HOME` and with `HF_ENDPOINT`/`HF_HUB_DISABLE_XET`
set before `huggingface_hub` is imported (this process imported it already, offline). A `sitecustomize` in those
subprocesses refuses and records any connection or DNS lookup that is not 127.0.0.1.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SECRET_API_KEY, run_pipeline, write_recipe
from hub_server import FakeHubServer
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, ModelCard

from modeling_emovlm_kd import DATASET_LABEL_SETS, LABEL_SETS
from train.commands import publish
from train.commands.card import HubFolder, PublishError, build_card, load_variants, package_label_sets
from train.commands.space import SETTINGS_FILE, pinned_versions
from train.infra.files import public_json, without_local_paths
from train.infra.registry import card_variants

ROOT = Path(__file__).resolve().parents[2]
WRITE_TOKEN, READ_TOKEN, WRONG_TOKEN = "hf_alice_write", "hf_bob_read", "hf_not_a_token"
COLOURS_REPO, FLICKR_REPO = "emo-org/emovlm-kd-colours", "emo-org/emovlm-kd-flickr"
PINNED_REPO, SPACE_REPO = "emo-org/emovlm-kd-pinned", "emo-org/emovlm-kd-pinned-demo"
HANDLER = ROOT / "modeling_emovlm_kd" / "handler.py"

NETWORK_GUARD = '''
"""Loaded by every test subprocess: refuse and record any network use outside 127.0.0.1."""
import os, socket

_LOG, _ALLOWED = os.environ["EMOVLM_NETWORK_LOG"], {"127.0.0.1"}
_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _check(host):
    if isinstance(host, str) and host not in _ALLOWED:
        with open(_LOG, "a") as log:
            log.write(f"{os.getpid()} {host}\\n")
        raise OSError(f"network access to {host} blocked by the test (only 127.0.0.1 is allowed)")


def connect(self, address):
    if isinstance(address, tuple):
        _check(address[0])
    return _connect(self, address)


def connect_ex(self, address):
    if isinstance(address, tuple):
        _check(address[0])
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    _check(host.decode() if isinstance(host, bytes) else host)
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
'''

# Loads each spec from the Hub (fresh HF_HOME) and from the local folder, and reports what a user would see.
LOAD_SCRIPT = '''
import json, os, re, sys
import numpy as np
import torch
from PIL import Image
from huggingface_hub import HfFileSystem, ModelCard, hf_hub_download
from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline

torch.set_num_threads(2)
specs = json.loads(sys.argv[1])
rng = np.random.default_rng(0)
images = [Image.new("RGB", (28, 28), c) for c in ((220, 40, 40), (40, 200, 40), (40, 40, 220))]
images.append(Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)))


def predictions(model_id, revision=None, auto_classes=True):
    kwargs = {"revision": revision} if revision else {}
    classifier = pipeline("image-classification", model=model_id, trust_remote_code=True, **kwargs)
    model, processor = classifier.model, classifier.image_processor
    if auto_classes:  # also load as a user of the Auto classes does
        model = AutoModelForImageClassification.from_pretrained(model_id, trust_remote_code=True, **kwargs)
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True, **kwargs)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    return {"pipeline": classifier(images, top_k=None), "logits": logits.tolist(),
            "labels": [model.config.id2label[i] for i in range(model.config.num_labels)], "class": type(model).__module__}


report = []
for spec in specs:
    hub = predictions(spec["repo_id"], spec.get("revision"))
    local = predictions(spec["local"], auto_classes=False)
    card = ModelCard.load(hf_hub_download(spec["repo_id"], "README.md", revision=spec.get("revision")))
    with HfFileSystem().open(f"{spec['repo_id']}/model.safetensors", "rb", revision=spec.get("revision"),
                             block_size=64) as remote:
        remote.seek(1000)
        middle = remote.read(48)
    with open(os.path.join(spec["local"], "model.safetensors"), "rb") as local_file:
        local_file.seek(1000)
        same_bytes = local_file.read(48) == middle
    report.append({"hub": hub, "local": local, "card_text": card.text, "card_data": card.data.to_dict(),
                   "range_read_matches": same_bytes})
    if spec.get("run_card_snippets"):
        images[0].save("photo.jpg")
        for code in re.findall(r"```python\\n(.*?)```", card.content, re.S):
            exec(code, {})
print("REPORT " + json.dumps(report))
'''

# Downloads the pushed model repo at a commit and serves one request through its handler.py, as an endpoint does.
ENDPOINT_SCRIPT = '''
import base64, io, json, sys
from huggingface_hub import snapshot_download
from PIL import Image

folder = snapshot_download(sys.argv[1], revision=sys.argv[2], local_dir=sys.argv[3])
sys.path.insert(0, folder)
from handler import EndpointHandler

buffer = io.BytesIO()
Image.new("RGB", (28, 28), (220, 40, 40)).save(buffer, format="PNG")
answer = EndpointHandler(folder)({"inputs": base64.b64encode(buffer.getvalue()).decode(), "parameters": {"top_k": 2}})
print("REPORT " + json.dumps(answer))
'''

# Downloads the Space as the Space runtime checks it out and starts its app.py's model loading from its own folder.
SPACE_SCRIPT = '''
import json, os, sys
from huggingface_hub import scan_cache_dir, snapshot_download

folder = snapshot_download(sys.argv[1], repo_type="space", local_dir=sys.argv[2])
os.chdir(folder)
sys.path.insert(0, folder)
import app

args = app.parse_args([])
classifier = app.load_classifier(args.checkpoint, args.revision)
examples = app.example_images(args.examples)
predictions = app.predict_paths(classifier, examples)
print("REPORT " + json.dumps({
    "app_file": app.__file__, "folder": folder, "settings_file": app.SPACE_SETTINGS.name,
    "checkpoint": args.checkpoint, "revision": args.revision, "labels": classifier.labels, "name": classifier.name,
    "cached_commits": sorted(revision.commit_hash for repo in scan_cache_dir().repos if repo.repo_id == args.checkpoint
                             for revision in repo.revisions), "examples": [os.path.relpath(p, folder) for p in examples],
    "predicted": [prediction.label for prediction in predictions]}))
'''

ANONYMOUS_SCRIPT = '''
import json, sys
from huggingface_hub import hf_hub_download

outcome = {}
for repo_id in sys.argv[1:]:
    try:
        hf_hub_download(repo_id, "config.json")
        outcome[repo_id] = "ok"
    except Exception as error:  # the test reads the error's type and message
        outcome[repo_id] = f"{type(error).__name__}: {error}"
print("REPORT " + json.dumps(outcome))
'''


# ---- fixtures ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub():
    tokens = {WRITE_TOKEN: ("alice", "write"), READ_TOKEN: ("bob", "read")}
    with FakeHubServer(tokens=tokens, organisations={"alice": ["emo-org"], "bob": ["emo-org"]}) as server:
        yield server


@pytest.fixture(scope="module")
def guard(tmp_path_factory):
    folder = tmp_path_factory.mktemp("network-guard")
    (folder / "sitecustomize.py").write_text(NETWORK_GUARD)
    log = folder / "attempts.log"
    log.touch()
    return folder, log


@pytest.fixture(scope="module")
def binary_run(colour_folder, tmp_path_factory):
    """A second tiny run whose labels are the Flickr/Instagram `binary` set (red images negative, blue positive)."""
    root = tmp_path_factory.mktemp("binary-run")
    for split in ("train", "validation", "test"):
        for source, label in (("red", "negative"), ("blue", "positive")):
            shutil.copytree(colour_folder / split / source, root / "images" / split / label)
    recipe_path = write_recipe(root / "recipe.yaml", root / "images", root / "out", sft_epochs=2, distill_epochs=5)
    recipe = yaml.safe_load(recipe_path.read_text())
    recipe["labels"] = "binary"
    recipe_path.write_text(yaml.safe_dump(recipe))
    run_pipeline(recipe_path)
    return root / "out"


def hub_env(hub, guard, token=None) -> dict:
    """Environment of a fresh client process: the test double's endpoint, no Xet, online, a new HF_HOME."""
    folder, log = guard
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    env.update({"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": tempfile.mkdtemp(prefix="emovlm-push-home-"),
                "PYTHONPATH": os.pathsep.join([str(folder), str(ROOT)]), "EMOVLM_NETWORK_LOG": str(log),
                "TOKENIZERS_PARALLELISM": "false"})
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def push_cli(env, *args) -> subprocess.CompletedProcess:
    """`python -m train push ...` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "train", "push", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def space_cli(env, *args) -> subprocess.CompletedProcess:
    """`python -m train push-space ...` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "train", "push-space", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def run_script(env, script, *args, cwd=None) -> object:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                            cwd=cwd or ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


@pytest.fixture(scope="module")
def pushes(hub, guard, tiny_run, binary_run, tmp_path_factory):
    """Three pushes: the colour run as `custom`, the binary run as private `flickr`, then the binary run again as
    `custom` into the colour repo (an update). Also the dry run of the first push."""
    env = hub_env(hub, guard, WRITE_TOKEN)
    colours, binary = tiny_run[0], binary_run
    dry_run = tmp_path_factory.mktemp("dry-run") / "to-upload"
    # The dry run names the run by its recipe (`--config`), the pushes by their folder (`--run-dir`).
    done = {"dry_run": dry_run, "dry_run_result": push_cli(env, "--config", str(tiny_run[1]), "--variant", "custom",
                                                           "--repo-id", COLOURS_REPO, "--dry-run", str(dry_run))}
    for name, run_dir, variant, repo_id, extra in (
        ("colours", colours, "custom", COLOURS_REPO, ["--commit-message", "First run"]),
        ("flickr", binary, "flickr", FLICKR_REPO, ["--private"]),
        ("update", binary, "custom", COLOURS_REPO, ["--commit-message", "Second run"]),
    ):
        commits_before = sum(1 for method, path, _ in hub.requests if method == "POST" and "/commit/" in path)
        result = push_cli(env, "--run-dir", str(run_dir), "--variant", variant, "--repo-id", repo_id, *extra)
        assert result.returncode == 0, result.stderr[-4000:]
        commit_posts = sum(1 for method, path, _ in hub.requests if method == "POST" and "/commit/" in path)
        done[name] = {"stdout": result.stdout, "head": hub.commits(repo_id)[0].oid,
                      "commit_posts": commit_posts - commits_before}
    return done


@pytest.fixture(scope="module")
def loaded(hub, guard, pushes, tiny_run, binary_run, tmp_path_factory):
    """One fresh process (new HF_HOME) loading every pushed revision from the Hub and its local folder."""
    specs = [
        {"repo_id": COLOURS_REPO, "revision": pushes["colours"]["head"], "local": str(tiny_run[0] / "final")},
        {"repo_id": FLICKR_REPO, "local": str(binary_run / "final"), "run_card_snippets": True},
        {"repo_id": COLOURS_REPO, "local": str(binary_run / "final")},
    ]
    report = run_script(hub_env(hub, guard, WRITE_TOKEN), LOAD_SCRIPT, json.dumps(specs),
                        cwd=tmp_path_factory.mktemp("load"))
    return dict(zip(("colours@first", "flickr", "colours@update"), report))


@pytest.fixture(scope="module")
def space(hub, guard, tiny_run, binary_run, tmp_path_factory):
    """The colour run pushed to PINNED_REPO with `--space`, its Space pushed (and dry-run) by push-space, then the
    binary run pushed to the same model repo: its `main` moved on after the Space pinned it."""
    env = hub_env(hub, guard, WRITE_TOKEN)
    result = push_cli(env, "--run-dir", str(tiny_run[0]), "--variant", "custom", "--repo-id", PINNED_REPO,
                      "--space", SPACE_REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    pinned = hub.commits(PINNED_REPO)[0].oid
    dry_run = tmp_path_factory.mktemp("space-dry-run") / "space"
    dry = space_cli(env, "--model", PINNED_REPO, "--space", SPACE_REPO, "--dry-run", str(dry_run))
    assert dry.returncode == 0, dry.stderr[-4000:]
    pushed = space_cli(env, "--model", PINNED_REPO, "--space", SPACE_REPO)
    assert pushed.returncode == 0, pushed.stderr[-4000:]
    space_head = hub.commits(f"spaces/{SPACE_REPO}")[0].oid
    update = push_cli(env, "--run-dir", str(binary_run), "--variant", "custom", "--repo-id", PINNED_REPO)
    assert update.returncode == 0, update.stderr[-4000:]
    app_report = run_script(hub_env(hub, guard), SPACE_SCRIPT, SPACE_REPO,
                            str(tmp_path_factory.mktemp("space-checkout") / "space"),
                            cwd=tmp_path_factory.mktemp("space-run"))
    return {"pinned": pinned, "main": hub.commits(PINNED_REPO)[0].oid, "dry_run": dry_run, "stdout": pushed.stdout,
            "space_head": space_head, "app": app_report, "env": env}


# ---- offline checks of the card and the variants -----------------------------------------------------------------


def test_card_names_the_minimum_transformers_of_setup_py():
    setup_py = (ROOT / "setup.py").read_text()
    (bound,) = re.findall(r'"transformers>=([0-9.]+)"', setup_py)
    assert load_variants()["common"]["min_transformers"] == bound
    assert pinned_versions()["transformers"] == bound  # the oldest supported version is the one tested


def test_card_of_a_7b_run_pins_its_branch_and_names_each_backbones_licence(tmp_path):
    labels = LABEL_SETS["mikels8"]
    folder = HubFolder(tmp_path, {"id2label": {str(i): label for i, label in enumerate(labels)}}, None)
    card = build_card(folder, "custom", "emo-org/emovlm-kd-7b", revision="v2", space="emo-org/emovlm-kd-7b-demo")
    text = ModelCard(str(card)).text
    assert "| [`Qwen/Qwen2-VL-7B-Instruct`](https://huggingface.co/Qwen/Qwen2-VL-7B-Instruct) | Apache-2.0 |" in text
    assert "| [`google/vit-base-patch16-384`](https://huggingface.co/google/vit-base-patch16-384) | Apache-2.0 |" \
        in text
    snippets = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(snippets) == 4 and all('revision="v2"' in code for code in snippets)
    assert 'pipeline("image-classification", model="emo-org/emovlm-kd-7b", revision="v2",' in text
    assert "dtype=torch.bfloat16" in snippets[2] and "BitsAndBytesConfig(load_in_4bit=True" in snippets[3]
    assert "replace `\"v2\"`" in text and "commit's hash" in text
    assert "/spaces/emo-org/emovlm-kd-7b-demo)" in text
    assert 'pip install "transformers>=5.23.0"' in text and "widget" not in card.data.to_dict()




def test_card_of_a_tiny_run_names_its_vlm_family(tmp_path):
    labels = ["red", "green", "blue"]
    metrics = {"accuracy": 0.5, "macro_f1": 0.25, "per_class_accuracy": [1.0, 0.5, 0.0]}
    results = {"labels": labels, "split": "test", "num_examples": 6, "recipe": {"base_models": {"tiny": True}},
               "branches": {branch: metrics for branch in ("vlm", "head", "teacher", "fused")}}
    config = {"id2label": dict(enumerate(labels)), "vlm_config": {"model_type": "qwen2_5_vl"}}
    text = ModelCard(str(build_card(HubFolder(tmp_path, config, results), "custom", "emo-org/tiny"))).text
    assert "tiny random Qwen2.5-VL built from a config" in text and "| Qwen2.5-VL alone | 0.5000 |" in text
    assert "Qwen2-VL" not in text.replace("Qwen2-VL-7B", "")


def test_card_marks_the_fused_validation_numbers_in_sample_when_the_gate_was_fitted_on_validation(tmp_path):
    """With `gate.fit_on: validation` the gate is fitted on the validation split: the fused model's validation
    accuracy there is in-sample, and the card says so and gives the cross-validated figure stage 3 recorded."""
    labels = ["red", "green", "blue"]
    metrics = {"accuracy": 0.5, "macro_f1": 0.25, "per_class_accuracy": [1.0, 0.5, 0.0]}
    results = {"labels": labels, "split": "test", "num_examples": 6, "recipe": {"base_models": {"tiny": True}},
               "branches": {branch: metrics for branch in ("vlm", "head", "teacher", "fused")},
               "validation": {branch: {"accuracy": 0.75, "macro_f1": 0.5} for branch in ("vlm", "head", "fused")},
               "validation_in_sample": {"fused": {"fit_on": "validation", "cross_validated_accuracy": 0.625}}}
    config = {"id2label": dict(enumerate(labels)), "vlm_config": {"model_type": "qwen2_vl"}}
    text = ModelCard(str(build_card(HubFolder(tmp_path, config, results), "custom", "emo-org/tiny"))).text
    assert "| EmoVLM-KD (fused) | 0.5000 | 0.2500 | 0.7500 (in-sample) | 0.5000 (in-sample) |" in text
    assert "| Distilled head | 0.5000 | 0.2500 | 0.7500 | 0.5000 |" in text
    assert "cross-validated accuracy there is 0.6250" in text
    del results["validation_in_sample"]  # the paper's setting (fit_on: train): nothing to mark
    text = ModelCard(str(build_card(HubFolder(tmp_path, config, results), "custom", "emo-org/tiny"))).text
    assert "in-sample" not in text and "| EmoVLM-KD (fused) | 0.5000 | 0.2500 | 0.7500 | 0.5000 |" in text


class RecordingApi:
    """What `commit_folder` asks of `HfApi`: the repo's files at the parent commit, then one commit."""

    def __init__(self, remote):
        self.remote, self.calls = remote, []

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        self.calls.append(("list_repo_files", repo_id, repo_type, revision))
        return self.remote

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, operations, kwargs))
        return "commit-info"


def test_a_push_is_its_staging_folder_in_one_commit_that_deletes_what_it_lacks(tmp_path):
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(b"weights")
    config.write_text("{}")
    plan = {"model.safetensors": weights, "config.json": config, "README.md": b"card",
            "examples/red/0.png": weights}
    staged = publish.stage(plan, tmp_path / "staged", link=True)
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == sorted(plan)
    assert (staged / "model.safetensors").stat().st_ino == weights.stat().st_ino  # linked, not copied
    assert (staged / "README.md").read_bytes() == b"card"
    with pytest.raises(PublishError, match="not empty"):
        publish.stage(plan, staged)
    copied = publish.stage(plan, tmp_path / "dry-run")
    assert (copied / "model.safetensors").stat().st_ino != weights.stat().st_ino
    api = RecordingApi([".gitattributes", "README.md", "model-00001-of-00002.safetensors", "examples/blue/0.png"])
    assert publish.commit_folder(api, "emo-org/x", staged, "a" * 40, "v2", commit_message="m") == "commit-info"
    (_, _, _, parent), (_, repo_id, operations, kwargs) = api.calls
    assert parent == "a" * 40 and repo_id == "emo-org/x"
    assert kwargs == {"repo_type": "model", "revision": "v2", "parent_commit": "a" * 40, "commit_message": "m"}
    deleted = [op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)]
    added = {op.path_in_repo: op.path_or_fileobj for op in operations if isinstance(op, CommitOperationAdd)}
    assert deleted == ["examples/blue/0.png", "model-00001-of-00002.safetensors"]  # never .gitattributes
    assert added == {path: str(staged / path) for path in plan}


def test_one_scrubber_empties_every_local_name_or_path(tmp_path):
    config = {"_name_or_path": "/runs/x/sft/merged", "vlm_config": {"_name_or_path": "~/models/qwen", "text_config": {
        "_name_or_path": "Qwen/Qwen2-VL-7B-Instruct"}}, "list": [{"_name_or_path": "/abs"}], "name": "/not/a/config/key"}
    assert without_local_paths(config) == {"_name_or_path": "", "vlm_config": {"_name_or_path": "", "text_config": {
        "_name_or_path": "Qwen/Qwen2-VL-7B-Instruct"}}, "list": [{"_name_or_path": ""}], "name": "/not/a/config/key"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert json.loads(public_json(path)) == without_local_paths(config)
    path.write_text(json.dumps(without_local_paths(config)))
    assert public_json(path) is None  # nothing to clean: the file goes as it is


def test_variants_file_agrees_with_the_package():
    variants = load_variants()
    assert set(variants["variants"]) == set(card_variants())
    for variant, label_set in DATASET_LABEL_SETS.items():
        assert variants["variants"][variant]["label_set"] == label_set
        assert variants["variants"][variant]["citation"].lstrip().startswith("@")
    assert package_label_sets() == (LABEL_SETS, DATASET_LABEL_SETS)


@pytest.mark.slow
def test_variant_whose_labels_differ_is_refused(tiny_run, hub, guard):
    folder = HubFolder.load(tiny_run[0])
    with pytest.raises(PublishError, match=r"not the emoset label set mikels8.*--variant custom"):
        build_card(folder, "emoset", "emo-org/x")
    result = push_cli(hub_env(hub, guard, WRITE_TOKEN), "--run-dir", str(tiny_run[0]), "--variant", "flickr",
                      "--repo-id", "emo-org/refused")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not the flickr label set binary" in result.stderr
    assert "emo-org/refused" not in hub.repos


@pytest.mark.slow
def test_card_without_results_reports_no_numbers(tiny_run, tmp_path):
    final = tmp_path / "final"
    shutil.copytree(tiny_run[0] / "final", final, ignore=shutil.ignore_patterns("results.json", "*.png"))
    card = build_card(HubFolder.load(final), "custom", "emo-org/no-results")
    parsed = ModelCard(str(card))
    assert parsed.data.eval_results is None and "model-index" not in parsed.data.to_dict()
    assert "has no evaluation results" in parsed.text and "| EmoVLM-KD (fused) |" not in parsed.text
    assert 'pipeline("image-classification", model="emo-org/no-results", trust_remote_code=True)' in parsed.text


# ---- against the Hub test double ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_round_trip_gives_the_local_labels_and_scores(loaded):
    for name, entry in loaded.items():
        hub, local = entry["hub"], entry["local"]
        assert hub["class"].startswith("transformers_modules."), name  # the remote code, not the local package
        assert hub["labels"] == local["labels"], name
        for hub_row, local_row in zip(hub["pipeline"], local["pipeline"]):
            assert [p["label"] for p in hub_row] == [p["label"] for p in local_row], name
            assert [p["score"] for p in hub_row] == pytest.approx([p["score"] for p in local_row], abs=1e-6), name
        np.testing.assert_allclose(hub["logits"], local["logits"], atol=1e-6, err_msg=name)
        assert entry["range_read_matches"], name
    assert loaded["colours@first"]["hub"]["labels"] == ["red", "green", "blue"]
    assert loaded["flickr"]["hub"]["labels"] == loaded["colours@update"]["hub"]["labels"] == LABEL_SETS["binary"]


@pytest.mark.slow
def test_pushed_cards_parse_and_carry_the_measured_numbers(loaded, tiny_run, binary_run, colour_folder):
    runs = {"colours@first": tiny_run[0], "flickr": binary_run, "colours@update": binary_run}
    for name, entry in loaded.items():
        results = json.loads((runs[name] / "final" / "results.json").read_text())
        card_data = entry["card_data"]
        (model_index,) = card_data["model-index"]
        (result,) = model_index["results"]
        metrics = {metric["type"]: metric["value"] for metric in result["metrics"]}
        assert metrics == {"accuracy": results["branches"]["fused"]["accuracy"],
                           "f1": results["branches"]["fused"]["macro_f1"]}, name
        assert card_data["pipeline_tag"] == "image-classification" and card_data["library_name"] == "transformers"
        assert result["dataset"]["split"] == "test" and "test-run" in card_data["tags"]
        text = entry["card_text"]
        assert "EmoVLM-KD: Fusing Distilled Expertise" in text and "2505.07164" in text
        for stage in ("Stage 1", "Stage 2", "Stage 3"):
            assert stage in text, name
        assert f"`{results['recipe']['sft']['learning_rate']}`" in text
    flickr = loaded["flickr"]
    assert flickr["card_data"]["model-index"][0]["results"][0]["dataset"] == {
        "name": "Flickr (Katsurai & Satoh)", "type": "flickr", "split": "test"}
    assert "label set `binary`" in flickr["card_text"] and "Katsurai, Marie and Satoh" in flickr["card_text"]
    assert "`negative`, `positive`" in flickr["card_text"] and "flickr" in flickr["card_data"]["tags"]
    colours = loaded["colours@first"]
    assert colours["card_data"]["model-index"][0]["results"][0]["dataset"]["name"] == colour_folder.name
    assert "label set `custom`" in colours["card_text"] and "`red`, `green`, `blue`" in colours["card_text"]
    assert "label set `binary`" in loaded["colours@update"]["card_text"]  # a custom push names a known set
    # A tiny run derives from no Hub model: the card must not claim Qwen2-VL-7B as its base.
    assert "base_model" not in colours["card_data"]


@pytest.mark.slow
def test_dry_run_holds_exactly_the_pushed_files(pushes, hub):
    assert pushes["dry_run_result"].returncode == 0, pushes["dry_run_result"].stderr
    dry_run = pushes["dry_run"]
    written = {p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file()}
    first = hub.repos[COLOURS_REPO].commits[pushes["colours"]["head"]]
    assert written == set(first.files) - {".gitattributes"}
    assert {"model.safetensors", "config.json", "configuration_emovlm_kd.py", "modeling_emovlm_kd.py",
            "processing_emovlm_kd.py", "processor_config.json", "tokenizer.json", "chat_template.jinja",
            "results.json", "confusion_matrix.png", "README.md"} <= written
    for path in written:
        assert (dry_run / path).read_bytes() == hub.file_content(COLOURS_REPO, path, pushes["colours"]["head"]), path
    assert first.files["model.safetensors"].is_lfs and first.files["confusion_matrix.png"].is_lfs


def test_no_secret_or_local_path_is_uploaded(pushes, hub, tiny_run, colour_folder):
    """The run's recipe holds `instructions.api_key` and absolute data and run paths: none is in any pushed file."""
    recipe = yaml.safe_load(tiny_run[1].read_text())
    assert recipe["instructions"]["api_key"] == SECRET_API_KEY and Path(recipe["data"]["root"]).is_absolute()
    head = pushes["colours"]["head"]
    files = hub.repos[COLOURS_REPO].commits[head].files
    assert "results.json" in files and "README.md" in files
    forbidden = [SECRET_API_KEY, str(colour_folder), str(colour_folder.resolve()), str(tiny_run[0]), ROOT.as_posix()]
    for path in files:
        content = hub.file_content(COLOURS_REPO, path, head)
        for text in forbidden:
            assert text.encode() not in content, (path, text)
    uploaded = json.loads(hub.file_content(COLOURS_REPO, "results.json", head))
    assert uploaded["recipe"]["instructions"]["api_key"] == "<redacted>"
    assert "root" not in uploaded["recipe"]["data"] and "output_dir" not in uploaded["recipe"]


@pytest.mark.slow
def test_pushing_a_new_run_is_one_commit_and_keeps_the_old_revision(pushes, hub, loaded):
    assert pushes["colours"]["commit_posts"] == pushes["update"]["commit_posts"] == 1
    history = hub.commits(COLOURS_REPO)
    assert [c.title for c in history] == ["Second run", "First run", "initial commit"]
    assert history[0].parent == pushes["colours"]["head"] == history[1].oid
    assert pushes["update"]["head"] in pushes["update"]["stdout"]
    # The old revision still loads, by its commit hash, with the first run's labels and scores (see the round trip).
    assert loaded["colours@first"]["hub"]["labels"] != loaded["colours@update"]["hub"]["labels"]


@pytest.mark.slow
def test_push_to_a_branch_leaves_main_alone(hub, guard, pushes, tiny_run):
    main_before = hub.repos[FLICKR_REPO].branches["main"]
    result = push_cli(hub_env(hub, guard, WRITE_TOKEN), "--run-dir", str(tiny_run[0]), "--variant", "custom",
                      "--repo-id", FLICKR_REPO, "--revision", "colours-experiment")
    assert result.returncode == 0, result.stderr[-4000:]
    branch = hub.commits(FLICKR_REPO, "colours-experiment")
    assert branch[1].oid == main_before and hub.repos[FLICKR_REPO].branches["main"] == main_before
    config = json.loads(hub.file_content(FLICKR_REPO, "config.json", "colours-experiment"))
    assert list(config["id2label"].values()) == ["red", "green", "blue"]
    assert "revision='colours-experiment'" in result.stdout


@pytest.mark.slow
def test_wrong_token_is_rejected_with_a_clear_message(hub, guard, tiny_run):
    for token, messages in ((WRONG_TOKEN, ["rejected the token", "Invalid user token", "HF_TOKEN"]),
                            (READ_TOKEN, ["read-only"]), (None, ["No Hugging Face token found"])):
        result = push_cli(hub_env(hub, guard, token), "--run-dir", str(tiny_run[0]), "--variant", "custom",
                          "--repo-id", "emo-org/never-created")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        for message in messages:
            assert message in result.stderr, result.stderr
    assert "emo-org/never-created" not in hub.repos


@pytest.mark.slow
def test_private_repo_cannot_be_read_without_the_token(hub, guard, pushes):
    outcome = run_script(hub_env(hub, guard), ANONYMOUS_SCRIPT, FLICKR_REPO, COLOURS_REPO)
    assert outcome[COLOURS_REPO] == "ok"
    assert outcome[FLICKR_REPO].startswith("RepositoryNotFoundError")
    assert hub.repos[FLICKR_REPO].private and not hub.repos[COLOURS_REPO].private
    wrong = run_script(hub_env(hub, guard, WRONG_TOKEN), ANONYMOUS_SCRIPT, FLICKR_REPO)
    assert "Invalid credentials in Authorization header" in wrong[FLICKR_REPO]


@pytest.mark.slow
def test_push_uploads_the_endpoint_handler_and_the_widget_examples(pushes, hub, guard, loaded, colour_folder,
                                                                     tmp_path):
    head = pushes["colours"]["head"]
    files = hub.repos[COLOURS_REPO].commits[head].files
    assert hub.file_content(COLOURS_REPO, "handler.py", head) == HANDLER.read_bytes()
    requirements = hub.file_content(COLOURS_REPO, "requirements.txt", head).decode()
    assert "transformers>=5.23.0" in requirements.splitlines()
    # The widget shows the first test image of each label, uploaded with the model, at its URL on this Hub.
    widget = loaded["colours@first"]["card_data"]["widget"]
    assert [entry["example_title"] for entry in widget] == ["red", "green", "blue"]
    for entry in widget:
        path = f"examples/{entry['example_title']}/0.png"
        assert entry["src"] == f"{hub.endpoint}/{COLOURS_REPO}/resolve/main/{path}" and path in files
        assert hub.file_content(COLOURS_REPO, path, head) == (colour_folder / "test" / entry["example_title"] /
                                                             "0.png").read_bytes()
    assert "widget" not in loaded["flickr"]["card_data"]  # a named data set's images are not uploaded by default
    update = hub.repos[COLOURS_REPO].commits[pushes["update"]["head"]].files
    assert not any(path.startswith("examples/red/") for path in update) and "examples/negative/0.png" in update
    # The card's snippets name the branch; the push prints the commit's hash to pin.
    assert 'revision="main"' in loaded["colours@first"]["card_text"]
    assert f"revision='{head}'" in pushes["colours"]["stdout"]
    # An endpoint built from the pushed repo at that commit answers a request.
    answer = run_script(hub_env(hub, guard), ENDPOINT_SCRIPT, COLOURS_REPO, head, str(tmp_path / "endpoint"),
                        cwd=tmp_path)
    # (the task format: the fused labels as a list of {label, score}, each branch's on the first element)
    assert len(answer) == 2 and {a["label"] for a in answer} <= {"red", "green", "blue"}
    assert answer[0]["vlm"]["label"] in ("red", "green", "blue") and 0 < answer[0]["head"]["score"] <= 1


@pytest.mark.slow
def test_card_4bit_snippet_keeps_head_gate_lm_head_and_merger_unquantised(pushes):
    card = (pushes["dry_run"] / "README.md").read_text()
    (code,) = [c for c in re.findall(r"```python\n(.*?)```", card, re.S) if "load_in_4bit" in c]
    code = code.replace(f'"{COLOURS_REPO}"', f'"{pushes["dry_run"]}"').replace('Image.open("photo.jpg")',
                                                                            'Image.new("RGB", (28, 28))')
    namespace = {}
    exec(code, namespace)
    import bitsandbytes as bnb

    quantised = {name for name, module in namespace["model"].named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert any(name.startswith("vlm.model.language_model.") for name in quantised)
    assert any(name.startswith("vlm.model.visual.blocks.") for name in quantised)
    kept = [name for name in quantised if name.startswith(("distillation_head", "gate", "vlm.lm_head",
                                                           "vlm.model.visual.merger"))]
    assert kept == []


@pytest.mark.slow
def test_space_loads_exactly_the_pinned_model_commit(space, hub):
    app = space["app"]
    assert space["main"] != space["pinned"]  # the model moved on after the Space was pushed
    assert Path(app["app_file"]).parent == Path(app["folder"]) and app["settings_file"] == SETTINGS_FILE
    assert (app["checkpoint"], app["revision"]) == (PINNED_REPO, space["pinned"])
    assert app["cached_commits"] == [space["pinned"]]  # the model's files came from that commit only
    assert app["labels"] == ["red", "green", "blue"]  # the pinned (colour) run, not main's binary one
    assert app["name"] == f"{PINNED_REPO}@{space['pinned']}"
    assert app["examples"] == ["examples/blue/0.png", "examples/green/0.png", "examples/red/0.png"]
    assert len(app["predicted"]) == 3 and set(app["predicted"]) <= {"red", "green", "blue"}
    assert space["pinned"] in space["stdout"]


@pytest.mark.slow
def test_space_files_metadata_and_pins(space, hub):
    key = f"spaces/{SPACE_REPO}"
    repo = hub.repos[key]
    assert repo.repo_type == "space" and repo.sdk == "gradio" and not repo.private
    files = set(repo.commits[space["space_head"]].files) - {".gitattributes"}
    dry_run = space["dry_run"]
    written = {p.relative_to(dry_run).as_posix() for p in dry_run.rglob("*") if p.is_file()}
    assert written == files == {"README.md", "app.py", "requirements.txt", SETTINGS_FILE, "examples/blue/0.png",
                                "examples/green/0.png", "examples/red/0.png"}
    for path in files:
        assert (dry_run / path).read_bytes() == hub.file_content(key, path, space["space_head"]), path
    assert hub.file_content(key, "app.py", space["space_head"]) == (ROOT / "app.py").read_bytes()
    card = ModelCard(hub.file_content(key, "README.md", space["space_head"]).decode())
    versions = pinned_versions()
    metadata = card.data.to_dict()
    assert metadata["sdk"] == "gradio" and metadata["app_file"] == "app.py" and metadata["models"] == [PINNED_REPO]
    assert metadata["sdk_version"] == versions["gradio"] and space["pinned"] in card.text
    requirements = hub.file_content(key, "requirements.txt", space["space_head"]).decode().splitlines()
    assert f"torch=={versions['torch']}+cpu" in requirements
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements
    for name in ("transformers", "tokenizers", "safetensors", "huggingface-hub", "pillow", "numpy"):
        assert f"{name}=={versions[name]}" in requirements
    assert not any(line.startswith("gradio") for line in requirements)  # the Space installs its sdk_version
    settings = json.loads(hub.file_content(key, SETTINGS_FILE, space["space_head"]))
    assert settings == {"checkpoint": PINNED_REPO, "revision": space["pinned"], "examples": "examples"}
    # The model card links to the Space (push --space).
    model_card = hub.file_content(PINNED_REPO, "README.md", space["pinned"]).decode()
    assert f"]({hub.endpoint}/spaces/{SPACE_REPO})" in model_card
    # Nothing secret or local in the Space either.
    for path in files:
        content = hub.file_content(key, path, space["space_head"])
        assert SECRET_API_KEY.encode() not in content and ROOT.as_posix().encode() not in content, path


@pytest.mark.slow
def test_push_space_again_pins_the_new_commit_in_one_commit(space, hub):
    key = f"spaces/{SPACE_REPO}"
    again = space_cli(space["env"], "--model", PINNED_REPO, "--space", SPACE_REPO)
    assert again.returncode == 0, again.stderr[-4000:]
    history = hub.commits(key)
    assert history[1].oid == space["space_head"] and len(history) == 3  # initial, first push, this one
    settings = json.loads(hub.file_content(key, SETTINGS_FILE))
    assert settings["revision"] == space["main"]
    files = set(history[0].files)
    # The binary run's examples replace the colour run's: stale files are deleted in the same commit.
    assert {"examples/negative/0.png", "examples/positive/0.png"} <= files
    assert not any(path.startswith("examples/red/") for path in files)


@pytest.mark.slow
def test_push_space_refuses_what_is_not_an_emovlm_kd_model(hub, guard, pushes, tmp_path):
    env = hub_env(hub, guard, WRITE_TOKEN)
    missing = space_cli(env, "--model", "emo-org/no-such-model", "--space", "emo-org/never-a-space")
    assert missing.returncode == 1 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    wrong_revision = space_cli(env, "--model", COLOURS_REPO, "--model-revision", "no-such-branch", "--space",
                               "emo-org/never-a-space")
    assert wrong_revision.returncode == 1 and "no revision 'no-such-branch'" in wrong_revision.stderr
    read_only = space_cli(hub_env(hub, guard, READ_TOKEN), "--model", COLOURS_REPO, "--space", "emo-org/never-a-space")
    assert read_only.returncode == 1 and "read-only" in read_only.stderr
    assert "spaces/emo-org/never-a-space" not in hub.repos


@pytest.mark.slow
def test_no_request_left_127_0_0_1_and_every_endpoint_was_served(guard, hub, loaded, pushes, tmp_path):
    folder, log = guard
    assert log.read_text() == ""
    # The guard is live: a request to the real Hub from a guarded process is refused and recorded.
    env = {**hub_env(hub, guard), "EMOVLM_NETWORK_LOG": str(tmp_path / "probe.log")}
    probe = subprocess.run([sys.executable, "-c", "import urllib.request; urllib.request.urlopen('https://huggingface.co')"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr
    assert "huggingface.co" in (tmp_path / "probe.log").read_text()
    assert hub.unhandled == []
    assert any(status == 206 for _, _, status in hub.requests)  # ranged downloads were served
    assert any(status == 302 for _, _, status in hub.requests)  # LFS files went through the storage redirect
