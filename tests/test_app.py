"""The Gradio demo app (`app.py`): its inference logic, and the real app driven end to end in headless Chromium.

The browser tests start `python app.py` on a free port with the tiny run's Hub-ready checkpoint and drive Debian's
Chromium through Playwright (`executable_path=/usr/bin/chromium`; Playwright never downloads a browser here).
They skip, saying why, when gradio, Playwright or Chromium is missing; with `EMOVLM_REQUIRE_BROWSER=1` (CI sets it)
a missing piece fails instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "app.py"
CHROMIUM = Path(os.environ.get("EMOVLM_CHROMIUM", "/usr/bin/chromium"))
# No GPU, no network: without the background-networking flags Chromium keeps dialling Google and is refused.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
REQUIRE_BROWSER = os.environ.get("EMOVLM_REQUIRE_BROWSER") == "1"
START_TIMEOUT_S = 120
RESULT_TIMEOUT_MS = 30_000
FUSED_LABEL = "#fused-label [data-testid=label-output-value]"
VLM_LABEL = "#vlm-label [data-testid=label-output-value]"
HEAD_LABEL = "#head-label [data-testid=label-output-value]"


def unavailable(reason: str):
    """Skip with `reason`, or fail when CI requires the browser test to really run."""
    if REQUIRE_BROWSER:
        pytest.fail(f"EMOVLM_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


def import_app():
    """`app.py` is a top-level script, not a package module: load it from its path."""
    if importlib.util.find_spec("gradio") is None:
        unavailable("gradio is not installed (pip install -e '.[app]')")
    if "emovlm_kd_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("emovlm_kd_app", APP)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules["emovlm_kd_app"]


@pytest.fixture(scope="module")
def app():
    return import_app()


@pytest.fixture(scope="module")
def checkpoint(tiny_run) -> Path:
    return tiny_run[0] / "final"


@pytest.fixture(scope="module")
def test_images(colour_folder) -> list[Path]:
    """One real test image per class of the tiny run."""
    return [sorted((colour_folder / "test" / label).glob("*.png"))[0] for label in ("red", "green", "blue")]


@pytest.fixture(scope="module")
def pipeline_labels(checkpoint, test_images) -> dict[Path, str]:
    """What `pipeline("image-classification")` says for each test image: the label the page must show."""
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(checkpoint), trust_remote_code=True)
    return {image: classifier(str(image), top_k=1)[0]["label"] for image in test_images}


# ---- inference logic, no browser ----------------------------------------------------------------------------


def test_branch_contributions_come_from_every_gate(app, checkpoint, test_images):
    """For all five gate types, the shares are the gate's own `branch_weights` on `fuse`'s inputs, and the
    fused probabilities are the model's."""
    classifier = app.load_classifier(checkpoint)
    model = classifier.model
    fusion = importlib.import_module(type(model.gate).__module__)  # the checkpoint's own fusion.py
    images = [str(path) for path in test_images]
    inputs = classifier.image_processor(images, return_tensors="pt")
    torch.manual_seed(0)
    for gate_type, gate_class in fusion.GATES.items():
        model.gate = gate_class(model.config.num_labels, num_experts=model.config.gate_num_experts).eval()
        model.config.gate_type = gate_type
        predictions = app.predict_paths(classifier, images)
        with torch.no_grad():
            output = model(**inputs)
            v, h = fusion.gate_inputs(output.vlm_logits, output.head_logits, model.config.gate_vlm_signal)
            expected = model.gate.branch_weights(v, h)
        shares = torch.tensor([[p.vlm_share, p.head_share] for p in predictions])
        torch.testing.assert_close(shares, expected.float(), msg=gate_type)
        torch.testing.assert_close(shares.sum(-1), torch.ones(len(images)), msg=gate_type)
        fused = torch.tensor([list(p.fused.values()) for p in predictions])
        torch.testing.assert_close(fused, output.logits.softmax(-1), msg=gate_type)
        assert f"<code>{gate_type}</code>" in app.contribution_html(predictions[0], gate_type)
        if gate_type == "dynamic_weighting":  # check against the gate's formula itself
            with torch.no_grad():  # Linear(C, C)(w1 v + w2 h) with w = softmax(weigher(cat(v, h)))
                w = model.gate.weigher(torch.cat([v, h], -1)).softmax(-1)
                parts = [(w[:, i : i + 1] * x) @ model.gate.proj.weight.T for i, x in enumerate((v, h))]
                torch.testing.assert_close(parts[0] + parts[1] + model.gate.proj.bias, model.gate(v, h))
            sizes = torch.stack([p.abs().sum(-1) for p in parts], -1)
            torch.testing.assert_close(shares, sizes / sizes.sum(-1, keepdim=True))


def test_bad_files_are_named_errors(app, checkpoint, tmp_path):
    classifier = app.load_classifier(checkpoint)
    empty, text = tmp_path / "empty.png", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"photo.png is empty \(0 bytes\)"):
        app.predict_one(classifier, str(empty), "photo.png")
    with pytest.raises(ValueError, match=r"notes.txt is not a readable image") as caught:
        app.predict_one(classifier, str(text), "notes.txt")
    assert str(tmp_path) not in str(caught.value)  # the user sees their file name, not the server's temp path


def test_the_app_shows_what_predict_writes(app, tiny_checkpoint, colour_folder, tmp_path):
    """One inference path: for the same files, a broken one and an oversized one among them, the app's batch
    table and `train predict`'s rows give the same fused label and score, VLM and head labels, and error rows for
    the same files; the app's shares are the model output's `branch_weights`, through the checkpoint's own code."""
    from PIL import Image

    from train.commands.predict import Predictor, predict_files, read_rows

    images = sorted(str(p) for p in (colour_folder / "test").rglob("*.png"))[:5]
    broken, thin = tmp_path / "broken.png", tmp_path / "thin.png"
    broken.write_text("not an image")
    Image.new("RGB", (20000, 2), (1, 2, 3)).save(thin)  # refused when loaded (as in test_predict)
    paths = [images[0], str(broken), *images[1:3], str(thin), *images[3:]]
    predict_files(Predictor(str(tiny_checkpoint)), paths, tmp_path / "preds.jsonl", batch_size=3,
                  show_progress=False)
    rows = {row["path"]: row for row in read_rows(tmp_path / "preds.jsonl")}

    classifier = app.load_classifier(tiny_checkpoint)
    # The front door is the checkpoint's own pipeline class, its remote code (no module fishing in the app).
    pipeline_module = sys.modules[type(classifier.pipeline).__module__]
    assert pipeline_module.__name__.startswith("transformers_modules.")
    assert Path(pipeline_module.__file__).read_bytes() == (tiny_checkpoint / "pipeline_emovlm_kd.py").read_bytes()
    table = app.classify_batch(classifier, "", [{"path": path, "orig_name": Path(path).name} for path in paths])
    assert [line[0] for line in table] == [Path(path).name for path in paths]
    columns = app.BATCH_COLUMNS
    for path, line in zip(paths, table):
        shown, row = dict(zip(columns, line)), rows[path]
        assert bool(shown["error"]) == bool(row["error"]), path
        if row["error"]:
            assert shown["error"].startswith(f"{Path(path).name} is not a readable image") and str(tmp_path) not in shown["error"]
            continue
        assert (shown["fused label"], shown["VLM label"], shown["head label"]) == (
            row["label"], row["vlm_label"], row["head_label"]), path
        assert shown["fused p"] == pytest.approx(row["score"], abs=1e-4), path
    assert {Path(p).name for p, row in rows.items() if row["error"]} == {"broken.png", "thin.png"}
    good = [path for path in paths if not rows[path]["error"]]
    predictions = app.predict_paths(classifier, good)
    inputs = classifier.image_processor(good, return_tensors="pt")
    with torch.no_grad():
        output = classifier.model(**inputs)
    shares = torch.tensor([[p.vlm_share, p.head_share] for p in predictions])
    torch.testing.assert_close(shares, output.branch_weights.float())
    assert [p.label for p in predictions] == [rows[path]["label"] for path in good]


def test_every_door_gives_the_same_answers(app, tiny_checkpoint, colour_folder, tmp_path):
    """`train predict`, the app's batch table, the Inference Endpoints handler and `pipeline()` classify through
    the one front door: for the same files (a broken and an oversized one among them) the same labels and scores,
    and error rows for the same files."""
    import base64
    import importlib.util

    from PIL import Image
    from transformers import pipeline

    from train.commands.predict import Predictor, predict_files, read_rows

    images = sorted(str(p) for p in (colour_folder / "test").rglob("*.png"))[:4]
    broken, thin = tmp_path / "broken.png", tmp_path / "thin.png"
    broken.write_text("not an image")
    Image.new("RGB", (20000, 2), (1, 2, 3)).save(thin)
    paths = [images[0], str(broken), images[1], str(thin), *images[2:]]
    bad = {str(broken), str(thin)}

    predict_files(Predictor(str(tiny_checkpoint), top_k=3), paths, tmp_path / "p.jsonl", batch_size=3,
                  show_progress=False)
    rows = {row["path"]: row for row in read_rows(tmp_path / "p.jsonl")}
    classifier = app.load_classifier(tiny_checkpoint)
    table = app.classify_batch(classifier, "", [{"path": path, "orig_name": Path(path).name} for path in paths])
    spec = importlib.util.spec_from_file_location("emovlm_handler", ROOT / "modeling_emovlm_kd" / "handler.py")
    handler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler_module)
    handler = handler_module.EndpointHandler(str(tiny_checkpoint))
    served = handler({"inputs": [base64.b64encode(Path(p).read_bytes()).decode() for p in paths],
                      "parameters": {"top_k": 3}})
    piped = pipeline("image-classification", model=str(tiny_checkpoint), trust_remote_code=True)(
        paths, batch_size=2, top_k=3)

    columns = app.BATCH_COLUMNS
    for i, path in enumerate(paths):
        row, shown = rows[path], dict(zip(columns, table[i]))
        answers = {"handler": served[i], "pipeline": piped[i]}
        if path in bad:  # an error in every door, naming the file (the handler names the request's input)
            assert row["error"] and Path(path).name in row["error"], row
            assert shown["error"].startswith(f"{Path(path).name} is not a readable image"), shown
            assert piped[i][0]["label"] is None and Path(path).name in piped[i][0]["error"]
            assert served[i][0]["label"] is None and served[i][0]["error"].startswith(f"inputs[{i}]: ")
            continue
        assert not row["error"] and not shown["error"]
        for door, answer in answers.items():
            assert [e["label"] for e in answer] == [e["label"] for e in row["top_k"]], door
            assert [e["score"] for e in answer] == pytest.approx([e["score"] for e in row["top_k"]], abs=1e-5), door
            assert (answer[0]["vlm"]["label"], answer[0]["head"]["label"]) == (row["vlm_label"], row["head_label"])
        assert (shown["fused label"], shown["VLM label"], shown["head label"]) == (
            row["label"], row["vlm_label"], row["head_label"])
        assert shown["fused p"] == pytest.approx(row["score"], abs=1e-4)
        assert shown["VLM share"] == pytest.approx(piped[i][0]["branch_weights"]["vlm"], abs=1e-4)


def test_the_app_loads_4bit_as_predict_does(app, tiny_checkpoint):
    """One 4-bit configuration: NF4 with double quantisation, `lm_head`, the visual merger, the head and the gate in
    full precision, whichever door loads the model (the app used to drop double quantisation)."""
    import bitsandbytes as bnb

    from train.commands.predict import Predictor

    models = {"app": app.load_classifier(tiny_checkpoint, load_in_4bit=True).model,
              "predict": Predictor(str(tiny_checkpoint), load_in_4bit=True).model}
    configs = {door: model.config.quantization_config for door, model in models.items()}
    for door, config in configs.items():
        config = config if isinstance(config, dict) else config.to_dict()
        assert config["bnb_4bit_use_double_quant"] and config["bnb_4bit_quant_type"] == "nf4", door
        assert config == (configs["predict"] if isinstance(configs["predict"], dict)
                          else configs["predict"].to_dict()), door
    for door, model in models.items():
        quantized = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
        assert quantized and any(".language_model." in name or ".layers." in name for name in quantized), door
        assert not any("merger" in name or "lm_head" in name or name.startswith(("distillation_head", "gate."))
                       for name in quantized), (door, sorted(quantized))


def test_explain_one_gives_the_reasoning_answer_next_to_the_same_label(app, checkpoint, test_images, tmp_path):
    """The function the app's "Why?" button and the server call: the reasoning answer, bounded, beside the label
    `predict_one` shows; a bad file is named as the user named it."""
    classifier = app.load_classifier(checkpoint)
    path = str(test_images[0])
    explained = app.explain_one(classifier, path, "photo.png", max_new_tokens=4)
    assert explained["label"] == app.predict_one(classifier, path, "photo.png").label
    assert isinstance(explained["explanation"], str) and 1 <= explained["explanation_tokens"] <= 4
    text = tmp_path / "upload"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="photo.png is not a readable image"):
        app.explain_one(classifier, str(text), "photo.png", max_new_tokens=4)


def test_a_checkpoint_without_the_front_door_is_refused_with_advice(app, tiny_checkpoint, tmp_path):
    import shutil

    old = shutil.copytree(tiny_checkpoint, tmp_path / "old-export")
    (old / "loading_emovlm_kd.py").unlink()
    with pytest.raises(app.CheckpointError, match="export it again"):
        app.load_classifier(old)


def test_missing_checkpoint_says_what_to_do(app, tmp_path, monkeypatch):
    monkeypatch.setattr(app, "DEFAULT_CHECKPOINT", tmp_path / "runs" / "demo" / "final")
    with pytest.raises(app.CheckpointError, match="Run `make demo` first"):
        app.resolve_checkpoint(tmp_path / "runs" / "demo" / "final")
    with pytest.raises(app.CheckpointError, match="neither a checkpoint folder nor a Hub repo id"):
        app.resolve_checkpoint(tmp_path / "nowhere")
    assert app.resolve_checkpoint("some-org/emovlm-kd-emoset") == "some-org/emovlm-kd-emoset"
    # The page still starts (a Space must) and shows the message instead of a model.
    demo = app.build_demo(None, "Run `make demo` first.")
    header = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "header")
    assert "No model loaded" in header.value and "make demo" in header.value


def test_space_settings_pin_the_defaults_and_flags_still_win(app, tiny_checkpoint, tmp_path, monkeypatch):
    """`emovlm_space.json` (written by `python -m train push-space`) sets the defaults; env and flags override."""
    for name in ("EMOVLM_CHECKPOINT", "EMOVLM_REVISION", "EMOVLM_EXAMPLES"):
        monkeypatch.delenv(name, raising=False)
    assert app.parse_args([]).revision is None  # no settings file next to the project's app.py
    sha = "0123456789abcdef0123456789abcdef01234567"
    settings = tmp_path / "emovlm_space.json"
    settings.write_text(f'{{"checkpoint": "emo-org/model", "revision": "{sha}", "examples": "examples"}}')
    monkeypatch.setattr(app, "SPACE_SETTINGS", settings)
    args = app.parse_args([])
    assert (args.checkpoint, args.revision, args.examples) == ("emo-org/model", sha, str(tmp_path / "examples"))
    monkeypatch.setenv("EMOVLM_REVISION", "main")
    assert app.parse_args([]).revision == "main"
    assert app.parse_args(["--revision", "v2", "--checkpoint", "x/y"]).revision == "v2"
    # A local folder has no revisions: the revision is not passed on, and the page names the folder alone.
    classifier = app.load_classifier(tiny_checkpoint, revision=sha)
    assert "@" not in classifier.name and classifier.labels


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"load_in_4bit": True}, {"device_map": "auto"}])
def test_the_app_loads_the_model_as_users_load_it(app, tiny_checkpoint, test_images, options):
    """`--dtype`, `--load-in-4bit`, `--device-map`: the page's numbers come from a model whose head and gate stay
    float32, and its labels agree with the float32 model's on most images."""
    reference = app.predict_paths(app.load_classifier(tiny_checkpoint), [str(p) for p in test_images])
    classifier = app.load_classifier(tiny_checkpoint, **options)
    for module in (classifier.model.distillation_head, classifier.model.gate):
        assert all(p.dtype == torch.float32 for p in module.parameters())
    predictions = app.predict_paths(classifier, [str(p) for p in test_images])
    top = lambda p: max(p.fused, key=p.fused.get)  # noqa: E731
    assert sum(top(a) == top(b) for a, b in zip(predictions, reference)) >= len(test_images) // 2
    args = app.parse_args(["--dtype", "bfloat16", "--device-map", "auto", "--load-in-4bit"])
    assert (args.dtype, args.device_map, args.load_in_4bit) == ("bfloat16", "auto", True)


def test_label_and_file_names_render_literally_in_markdown(app, tiny_checkpoint, tmp_path):
    """Labels and uploaded file names are text, not Markdown or HTML, wherever the page renders Markdown."""
    from markdown_it import MarkdownIt

    classifier = app.load_classifier(tiny_checkpoint)
    odd = ["*bold*", "<script>alert(1)</script>", "a_b_c_", "[link](http://example.com)", "`code`", "$x$"]
    header = MarkdownIt().render(app.header_markdown(dataclasses.replace(classifier, labels=odd), ""))
    for label in ("*bold*", "&lt;script&gt;alert(1)&lt;/script&gt;", "a_b_c_", "[link](http://example.com)",
                  "`code`", "$x$"):
        assert label in header, header
    assert not any(tag in header for tag in ("<em>", "<script", 'href="http://example.com"', "<code>"))
    text = tmp_path / "upload"
    text.write_text("not an image")
    outputs = app.classify_image(classifier, "", {"path": str(text), "orig_name": "<img src=x onerror=alert(1)>.png"})
    error = MarkdownIt().render(outputs[-1])
    assert "&lt;img src=x onerror=alert(1)&gt;.png is not a readable image" in error and "<img" not in error


def test_uploads_over_the_size_limit_are_refused(tiny_checkpoint, tmp_path):
    """`EMOVLM_MAX_FILE_SIZE` (or `--max-file-size`) reaches Gradio: a larger upload gets HTTP 413 before it is stored, a smaller one is taken."""
    import httpx

    url = f"http://127.0.0.1:{free_port()}/"
    log = tmp_path / "app.log"
    (tmp_path / "examples").mkdir()
    command = [sys.executable, str(APP), "--checkpoint", str(tiny_checkpoint), "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1].strip("/"), "--examples", str(tmp_path / "examples")]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "uploads"), "HF_HUB_OFFLINE": "1",
           "EMOVLM_MAX_FILE_SIZE": "10kb"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until_serving(url, process, log)
        big = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", b"x" * 20_000)})
        small = httpx.post(url + "gradio_api/upload", files={"files": ("small.png", b"x" * 2_000)})
        assert big.status_code == 413, (big.status_code, big.text)
        assert small.status_code == 200, (small.status_code, small.text)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_max_file_size_flag_takes_sizes_and_refuses_nonsense(app, capsys):
    assert app.parse_args(["--max-file-size", "5mb"]).max_file_size == 5 * 1024 * 1024
    assert app.parse_args(["--max-file-size", "1000"]).max_file_size == 1000
    with pytest.raises(SystemExit) as exited:
        app.parse_args(["--max-file-size", "0"])
    assert exited.value.code == 2 and "argument --max-file-size" in capsys.readouterr().err


def fake_prediction(app, labels, fused, vlm, head, vlm_share):
    """A Prediction whose top labels are `fused`, `vlm` and `head` (probability 0.6 each, the rest shared)."""
    def probs(top):
        rest = 0.4 / (len(labels) - 1)
        return {label: 0.6 if label == top else rest for label in labels}

    return app.Prediction(fused=probs(fused), vlm=probs(vlm), vlm_log_likelihood=dict.fromkeys(labels, -1.0),
                          head=probs(head), vlm_share=vlm_share, head_share=1 - vlm_share)


def test_the_branch_share_is_explained_in_words(app):
    """Beside "VLM 72.9%": what the share is for the gate type (how much each branch's input moved the fused
    logits, up or down, over every label), what it is not (a probability of being right, a vote for the label
    shown), and, when the branch with the larger share answered another label than the fused one, that it did."""
    labels = ["awe", "fear", "sadness"]
    gate_words = {"concat_linear": "Linear(2C→C)", "moe": "experts", "bilinear": "Shapley",
                  "dynamic_weighting": "softmax", "cross_gating": "sigmoid"}
    for gate, words in gate_words.items():
        agree = app.share_explanation(fake_prediction(app, labels, "awe", "awe", "fear", 0.729), gate, "one_hot")
        assert words in agree, gate
        assert "not the probability that the branch is right" in agree
        assert "answered" not in agree  # the larger share's branch agrees with the decision: nothing to flag
        assert "one-hot" in agree  # the gate sees the VLM's label, not its confidence
    # The case: the VLM has 72.9 % of the share but gives the fused label (awe) almost nothing.
    disagree = app.share_explanation(fake_prediction(app, labels, "awe", "fear", "awe", 0.729), "concat_linear",
                                     "probs")
    assert "VLM has the larger share but answered fear, not the fused awe" in disagree
    assert "gives awe 20.0 %" in disagree and "The fused awe is the distilled head's answer" in disagree
    assert "one-hot" not in disagree
    neither = app.share_explanation(fake_prediction(app, labels, "awe", "fear", "sadness", 0.2), "moe", "probs")
    assert "distilled head has the larger share but answered sadness" in neither
    assert "neither branch's own answer" in neither
    html_text = app.contribution_html(fake_prediction(app, labels, "awe", "fear", "awe", 0.729), "concat_linear",
                                      "probs")
    assert "VLM 72.9%" in html_text and "distilled head 27.1%" in html_text
    assert "answered fear, not the fused awe" in html_text
    odd = fake_prediction(app, ["<b>x</b>", "y"], "<b>x</b>", "y", "<b>x</b>", 0.9)
    assert "<b>x</b>" not in app.contribution_html(odd, "concat_linear", "probs")  # labels are text, not HTML


def test_examples_show_their_true_class(app, tiny_checkpoint, tmp_path):
    """An example in a folder named after one of the model's labels (as given, or as `push` names folders) is
    captioned with that true class, and classifying it (by click or as an upload of the same file) says whether the
    fused label matches; an example in a folder that is no label is captioned by the folder's name only."""
    from PIL import Image

    from train.commands.publish import safe_name

    assert app.true_label("ankle_boot", ["t-shirt", "ankle boot"]) == "ankle boot" == \
        app.true_label(safe_name("ankle boot"), ["t-shirt", "ankle boot"])
    assert app.true_label("t-shirt", ["t-shirt", "ankle boot"]) == "t-shirt"
    assert app.true_label("holiday", ["t-shirt", "ankle boot"]) is None
    classifier = app.load_classifier(tiny_checkpoint)
    folder = tmp_path / "examples"
    for name, colour in (("awe", (10, 200, 30)), ("fear", (200, 10, 30)), ("my-photo", (30, 30, 200))):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(folder / name / "0.png")
    paths = app.example_images(folder, suffixes=classifier.image_suffixes)
    assert app.example_captions(paths, classifier.labels) == ["true class: awe", "true class: fear", "my-photo"]
    demo = app.build_demo(classifier, "", str(folder))
    (dataset,) = [block for block in demo.blocks.values() if type(block).__name__ == "Dataset"]
    assert dataset.sample_labels == ["true class: awe", "true class: fear", "my-photo"]
    truths = app.example_truths(paths, classifier.labels)
    assert sorted(truths.values()) == ["awe", "fear"]
    copy = tmp_path / "upload.png"  # Gradio hands the handler a copy of the example: matched by content
    copy.write_bytes((folder / "fear" / "0.png").read_bytes())
    outputs = app.classify_image(classifier, "", {"path": str(copy), "orig_name": "0.png"}, truths)
    (prediction,) = app.predict_paths(classifier, [str(copy)])
    verdict = "matches" if prediction.label == "fear" else f"differs (fused: {prediction.label})"
    assert outputs[-2] == f"True class of this example: **fear**; the fused decision {verdict}."
    other = app.classify_image(classifier, "", {"path": str(folder / "my-photo" / "0.png"), "orig_name": "0.png"},
                               truths)
    assert other[-2] == ""


def test_batch_results_download_as_csv_with_the_columns_predict_writes(app, tiny_checkpoint, tmp_path):
    """The Batch tab's CSV has `predict --output x.csv`'s header and, for the same files (a broken one among them),
    the same labels, scores and error rows; only `path` is the uploaded file's name."""
    import csv

    from conftest import random_images

    from train.commands.predict import CSV_FIELDS, Predictor, predict_files

    paths = []
    for i, image in enumerate(random_images(3, seed=5)):
        image.save(tmp_path / f"photo{i}.png")
        paths.append(str(tmp_path / f"photo{i}.png"))
    (tmp_path / "broken.png").write_text("not an image")
    paths.insert(1, str(tmp_path / "broken.png"))
    predict_files(Predictor(str(tiny_checkpoint)), paths, tmp_path / "predict.csv", batch_size=2, show_progress=False)
    with open(tmp_path / "predict.csv", newline="") as handle:
        predicted = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    classifier = app.load_classifier(tiny_checkpoint)
    table, csv_path = app.classify_batch_download(classifier, "", [{"path": p, "orig_name": Path(p).name}
                                                                   for p in paths])
    assert [line[0] for line in table] == [Path(p).name for p in paths]
    assert Path(csv_path).name == "predictions.csv"
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_FIELDS
        downloaded = list(reader)
    assert [row["path"] for row in downloaded] == [Path(p).name for p in paths]
    for row in downloaded:
        want = predicted[row["path"]]
        assert bool(row["error"]) == bool(want["error"]), row
        if row["error"]:
            assert row["error"].startswith(f"{row['path']} is not a readable image")
            assert (row["label"], row["score"]) == ("", "")
            continue
        assert (row["label"], row["vlm_label"], row["head_label"]) == (want["label"], want["vlm_label"],
                                                                       want["head_label"])
        assert float(row["score"]) == pytest.approx(float(want["score"]), abs=1e-6)
    assert app.classify_batch_download(classifier, "", []) == ([], None)


def test_the_why_button_shows_the_reasoning_with_what_it_costs(app, tiny_checkpoint, tmp_path):
    """The "Why?" button's handler: `explain_one`'s reasoning text, and a note that it cost one generation (of how
    many tokens) and, on a tiny model such as the tests' and the demo's, that the text is noise."""
    from conftest import random_images

    classifier = app.load_classifier(tiny_checkpoint)
    image = tmp_path / "photo.png"
    random_images(1, seed=2)[0].save(image)
    text, note = app.explain_image(classifier, "", {"path": str(image), "orig_name": "photo.png"}, max_new_tokens=4)
    explained = app.explain_one(classifier, str(image), "photo.png", max_new_tokens=4)
    assert text == explained["explanation"]
    assert f"{explained['explanation_tokens']} of at most 4 tokens" in note and "one generation" in note
    assert f"fused label ({markdown_escaped(app, explained['label'])})" in note
    assert "noise" in note  # the tiny model's VLM: a few hundred thousand parameters
    assert app.explain_image(classifier, "", None, max_new_tokens=4) == ("", "Upload or pick an image first.")
    (tmp_path / "notes.png").write_text("not an image")
    text, note = app.explain_image(classifier, "", {"path": str(tmp_path / "notes.png"), "orig_name": "x.png"},
                                   max_new_tokens=4)
    assert text == "" and app.markdown_literal("x.png is not a readable image") in note


def markdown_escaped(app, text: str) -> str:
    return app.markdown_literal(text)


def test_the_app_api_has_named_endpoints_and_serves_the_csv(app, tiny_checkpoint, tmp_path):
    """The real app over HTTP with Gradio's own client: its public endpoints are /classify, /classify_batch and
    /explain (they were /lambda, /lambda_1, /lambda_3), and /classify_batch returns the table and a CSV file."""
    from conftest import random_images
    from gradio_client import Client, handle_file

    classifier = app.load_classifier(tiny_checkpoint)
    demo = app.build_demo(classifier, "", None)
    assert set(demo.get_api_info()["named_endpoints"]) == {"/classify", "/classify_batch", "/explain"}
    assert not [fn.api_name for fn in demo.fns.values() if "lambda" in str(fn.api_name)]

    url = f"http://127.0.0.1:{free_port()}/"
    log = tmp_path / "app.log"
    (tmp_path / "examples").mkdir()
    command = [sys.executable, str(APP), "--checkpoint", str(tiny_checkpoint), "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1].strip("/"), "--examples", str(tmp_path / "examples")]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "uploads"), "HF_HUB_OFFLINE": "1"}
    images = []
    for i, image in enumerate(random_images(2, seed=9)):
        image.save(tmp_path / f"p{i}.png")
        images.append(tmp_path / f"p{i}.png")
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        wait_until_serving(url, process, log)
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
            "/classify", "/classify_batch", "/explain"}
        table, csv_file = client.predict([handle_file(str(p)) for p in images], api_name="/classify_batch")
        rows = table["data"]
        assert [row[0] for row in rows] == ["p0.png", "p1.png"]
        header, *lines = Path(csv_file).read_text().splitlines()
        assert header == "path,label,score,vlm_label,head_label,error"
        assert [line.split(",")[1] for line in lines] == [row[1] for row in rows]
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---- the app in a browser -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll the page until it answers; fail with the app's log if the process dies or never answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"app.py did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def browser_stack():
    """Playwright's sync API, after checking Chromium and Playwright are here (skip or fail otherwise)."""
    if importlib.util.find_spec("gradio") is None:
        unavailable("gradio is not installed (pip install -e '.[app]')")
    if importlib.util.find_spec("playwright") is None:
        unavailable("Playwright's Python package is not installed (pip install -e '.[app]')")
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)) and not shutil.which(str(CHROMIUM)):
        unavailable(f"Chromium is not installed at {CHROMIUM} (Debian: apt-get install -y chromium; CI installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="module")
def server(browser_stack, checkpoint, colour_folder, tmp_path_factory):
    """`python app.py` on a free port of 127.0.0.1, as `make app` runs it; stopped after the module."""
    workdir = tmp_path_factory.mktemp("app")
    log = workdir / "app.log"
    url = f"http://127.0.0.1:{free_port()}/"
    command = [sys.executable, str(APP), "--checkpoint", str(checkpoint), "--host", "127.0.0.1",
               "--port", url.rsplit(":", 1)[1].strip("/"), "--examples", str(colour_folder / "test")]
    env = {**os.environ, "GRADIO_TEMP_DIR": str(workdir / "uploads"), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    try:
        wait_until_serving(url, process, log)
        yield url, process, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def page(browser_stack, tmp_path):
    """A fresh headless Chromium (new, empty profile) for each test."""
    context = browser_stack.chromium.launch_persistent_context(
        str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 1000},
    )
    page = context.new_page()
    page.set_default_timeout(RESULT_TIMEOUT_MS)
    yield page
    context.close()


def upload_and_read_label(page, url: str, image: Path) -> str:
    """Open the page, upload `image`, wait for the fused decision and return the label it shows."""
    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    label = page.locator(FUSED_LABEL)
    label.wait_for(state="visible")
    return label.inner_text().strip()


def shown_shares(page) -> tuple[float, float]:
    """The VLM and head percentages of the contributions panel."""
    vlm = page.locator("#contribution .vlm-key").inner_text()  # "VLM 62.3%"
    head = page.locator("#contribution .head-key").inner_text()  # "distilled head 37.7%"
    return float(vlm.split()[-1].rstrip("%")), float(head.split()[-1].rstrip("%"))


def test_page_shows_the_pipeline_label(server, page, checkpoint, test_images, pipeline_labels, app, tmp_path):
    """Upload each test image; the fused label equals the pipeline's; VLM, head and shares are the model's."""
    url, process, _ = server
    classifier = app.load_classifier(checkpoint)
    for image in test_images:
        assert upload_and_read_label(page, url, image) == pipeline_labels[image], image
        (expected,) = app.predict_paths(classifier, [str(image)])
        assert page.locator(VLM_LABEL).inner_text().strip() == max(expected.vlm, key=expected.vlm.get)
        assert page.locator(HEAD_LABEL).inner_text().strip() == max(expected.head, key=expected.head.get)
        vlm, head = shown_shares(page)
        assert vlm == pytest.approx(100 * expected.vlm_share, abs=0.06)
        assert head == pytest.approx(100 * expected.head_share, abs=0.06)
    screenshot = tmp_path / "app.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
    assert process.poll() is None


def test_bad_uploads_show_errors_and_the_app_keeps_serving(server, page, test_images, pipeline_labels, tmp_path):
    url, process, _ = server
    empty, fake, text = tmp_path / "empty.png", tmp_path / "fake.png", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    fake.write_text("a text file named like a PNG")
    text.write_text("just text")
    good = test_images[0]
    page.goto(url)
    upload = page.locator("#input-image input[type=file]")
    error = page.locator("#image-error")

    upload.set_input_files(str(empty))
    error.filter(has_text="empty.png is empty (0 bytes)").wait_for()
    upload.set_input_files(str(fake))
    error.filter(has_text="fake.png is not a readable image").wait_for()
    assert page.locator(FUSED_LABEL).count() == 0  # no stale result next to a bad image

    upload.set_input_files(str(good))  # still serving: a good image right after the bad ones works
    page.locator(FUSED_LABEL).filter(has_text=pipeline_labels[good]).wait_for()
    # A .txt never reaches the server: Gradio's upload widget refuses it with a message in the page.
    upload.set_input_files(str(text))
    page.locator(".toast-body").filter(has_text="notes.txt").first.wait_for()

    # Batch: the good files get labels, each bad file a row with its error; the table keeps the upload order.
    page.get_by_role("tab", name="Batch").click()
    page.locator("#batch-files input[type=file]").set_input_files([str(good), str(empty), str(text), str(fake)])
    page.locator("#batch-files").get_by_text("fake").first.wait_for()  # the widget shows stem and suffix apart
    page.locator("#batch-run").click()
    table = page.locator("#batch-table")
    # Only the grid's cells: the table also renders a hidden copy of its values to size the columns.
    table.locator("[role=gridcell]", has_text="is not a readable image").first.wait_for()
    rows = table.locator("[role=row]")  # the grid's rows; the first is the header
    assert rows.count() == 5
    cells = [rows.nth(i).locator("[role=gridcell]").all_inner_texts() for i in range(1, 5)]
    assert [row[0].strip() for row in cells] == [good.name, "empty.png", "notes.txt", "fake.png"]
    assert cells[0][1].strip() == pipeline_labels[good] and not cells[0][-1].strip()
    assert "empty (0 bytes)" in cells[1][-1] and all("not a readable image" in row[-1] for row in cells[2:])
    assert process.poll() is None
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
