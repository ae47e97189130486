"""`python -m train push` against `FakeHubServer`, a Hub-protocol test double on 127.0.0.1 (tests/hub_server.py).

Pushes and loads run in fresh subprocesses, each with its own `HF_HOME` and with `HF_ENDPOINT`/`HF_HUB_DISABLE_XET`
set before `huggingface_hub` is imported (this process imported it already, offline). A `sitecustomize` in those
subprocesses refuses and records any connection or DNS lookup that is not 127.0.0.1.
"""

import json
import os
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
from huggingface_hub import ModelCard

from modeling_emovlm_kd import DATASET_LABEL_SETS, LABEL_SETS
from train.publish import VARIANTS, HubFolder, PublishError, build_card, load_variants, package_label_sets

ROOT = Path(__file__).resolve().parents[2]
WRITE_TOKEN, READ_TOKEN, WRONG_TOKEN = "hf_alice_write", "hf_bob_read", "hf_not_a_token"
COLOURS_REPO, FLICKR_REPO = "emo-org/emovlm-kd-colours", "emo-org/emovlm-kd-flickr"

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


# ---- offline checks of the card and the variants -----------------------------------------------------------------


def test_variants_file_agrees_with_the_package():
    variants = load_variants()
    assert set(variants["variants"]) == set(VARIANTS)
    for variant, label_set in DATASET_LABEL_SETS.items():
        assert variants["variants"][variant]["label_set"] == label_set
        assert variants["variants"][variant]["citation"].lstrip().startswith("@")
    assert package_label_sets() == (LABEL_SETS, DATASET_LABEL_SETS)
    assert variants["common"]["base_model"] == "Qwen/Qwen2-VL-7B-Instruct"


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
