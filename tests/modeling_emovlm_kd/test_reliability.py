"""Bad input gets clear errors, big images stay bounded, and loading a stranger's checkpoint runs nothing."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

from modeling_emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDImageProcessor


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint)


def test_broken_files_raise_errors_naming_them(processor, tmp_path):
    jpeg = tmp_path / "truncated.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a picture")
    for name in ("truncated.jpg", "zero.jpg", "text.jpg"):
        with pytest.raises(ValueError, match=name):
            processor(str(tmp_path / name), return_tensors="pt")
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        processor(str(tmp_path / "nowhere.png"), return_tensors="pt")


@torch.no_grad()
def test_tiny_and_odd_mode_images_classify(tiny_checkpoint, processor, tmp_path):
    model = EmoVLMKDForImageClassification.from_pretrained(tiny_checkpoint).eval()
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    gif = tmp_path / "anim.gif"
    rgb.save(gif, save_all=True, append_images=[rgb.rotate(180)])
    images = [Image.new("RGB", (1, 1), (255, 0, 0)), rgb.convert("CMYK"), rgb.convert("P"),
              Image.fromarray((np.arange(2000).reshape(40, 50) * 30).astype(np.uint16)), Image.open(gif)]
    out = model(**processor(images, return_tensors="pt"))
    assert out.logits.shape == (5, 8) and torch.isfinite(out.logits).all()


BIG_IMAGE_SCRIPT = textwrap.dedent(
    """
    import sys
    from modeling_emovlm_kd import EmoVLMKDImageProcessor

    def peak():  # KiB; VmHWM is this process's own peak (ru_maxrss would start at the forking parent's RSS)
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

    processor = EmoVLMKDImageProcessor.from_pretrained(sys.argv[1])
    before = peak()
    out = processor(sys.argv[2], return_tensors="pt")
    print(int(out["image_grid_thw"].prod()), (peak() - before) // 1024)
    """
)


def test_a_10000_pixel_square_jpeg_is_decoded_small(tiny_checkpoint, tmp_path):
    big = tmp_path / "big.jpg"
    Image.new("RGB", (10000, 10000), (90, 120, 200)).save(big, quality=70)  # 300 MB once decoded
    result = subprocess.run([sys.executable, "-c", BIG_IMAGE_SCRIPT, str(tiny_checkpoint), str(big)],
                            capture_output=True, text=True, check=True)
    patches, extra_mib = map(int, result.stdout.split())
    max_pixels = EmoVLMKDImageProcessor.from_pretrained(tiny_checkpoint).size.longest_edge
    assert patches * 14 * 14 <= max_pixels
    assert extra_mib < 100, f"decoding used {extra_mib} MiB"


PIPELINE_BIG_IMAGE_SCRIPT = textwrap.dedent(
    """
    import sys
    from transformers import pipeline

    def peak():  # KiB, this process's own peak
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])

    classifier = pipeline("image-classification", model=sys.argv[1], trust_remote_code=True)
    classifier(sys.argv[2])  # warm up on a small image: first-call allocations are not the big image's
    before = peak()
    prediction = classifier(sys.argv[3], top_k=1)
    print(type(classifier).__name__, prediction[0]["label"], (peak() - before) // 1024)
    """
)


def test_pipeline_decodes_a_10000_pixel_square_jpeg_path_small(tiny_checkpoint, tmp_path):
    """`pipeline()` hands paths to the model's image processor (the checkpoint's custom pipeline class); the stock
    pipeline decoded the whole file (+300 MB of pixels, +760 MB peak) before the processor saw it."""
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    Image.new("RGB", (10000, 10000), (90, 120, 200)).save(big, quality=70)
    Image.new("RGB", (40, 40), (90, 120, 200)).save(small)
    result = subprocess.run([sys.executable, "-c", PIPELINE_BIG_IMAGE_SCRIPT, str(tiny_checkpoint), str(small),
                             str(big)], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    name, label, extra_mib = result.stdout.split()
    assert name == "EmoVLMKDImageClassificationPipeline"
    assert extra_mib.isdigit() and int(extra_mib) < 100, f"pipeline() used {extra_mib} MiB for the big JPEG"


def test_decompression_bomb_guard_is_kept(processor, tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpixel, a few KB on disk
    with pytest.raises(ValueError, match="bomb.png"):
        processor(str(bomb), return_tensors="pt")


def test_images_over_max_image_pixels_are_refused_from_the_header(processor, tmp_path):
    """The bound is checked before decoding: a truncated file claiming 5000x4000 pixels fails on its size."""
    assert processor.max_image_pixels == 150_000_000  # the default, saved with the checkpoint
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 4000), (10, 20, 30)).save(big)
    big.write_bytes(big.read_bytes()[:200])  # header intact, pixel data gone
    strict = EmoVLMKDImageProcessor.from_dict({**processor.to_dict(), "max_image_pixels": 10_000_000})
    with pytest.raises(ValueError, match=r"big\.png is 5000x4000 pixels \(20\.0 Mpixel\).*max_image_pixels"):
        strict(str(big), return_tensors="pt")
    with pytest.raises(ValueError, match=r"5000x4000 pixels"):  # also for an image already in memory
        strict(Image.new("L", (5000, 4000)), return_tensors="pt")
    with pytest.raises(ValueError, match="big.png"):  # under the bound, the truncation is what fails
        processor(str(big), return_tensors="pt")
    strict.save_pretrained(tmp_path / "saved")
    assert EmoVLMKDImageProcessor.from_pretrained(tmp_path / "saved").max_image_pixels == 10_000_000


def test_a_too_thin_image_gets_an_error_naming_the_file(processor, tmp_path):
    thin = tmp_path / "thin.png"
    Image.new("RGB", (20000, 2)).save(thin)
    with pytest.raises(ValueError, match=r"thin\.png.*aspect ratio"):
        processor(str(thin), return_tensors="pt")


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGBA", "LA", "PA", "CMYK", "I;16", "I", "F"])
def test_large_images_are_shrunk_before_mode_conversion_with_the_same_result(processor, tmp_path, mode):
    """Shrinking first (to the size the model sees) changes the pixels only by resampling noise."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(np.kron(rng.integers(0, 256, (15, 20, 3)), np.ones((40, 40, 1))).astype(np.uint8))
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray((np.asarray(rgb.convert("L")).astype(np.float64) * 257).astype(np.uint16))
        image = image if mode == "I;16" else image.convert(mode)
        reference = rgb.convert("L").convert("RGB")
    elif mode == "PA":
        image = rgb.convert("P").convert("PA")
        reference = rgb.convert("P").convert("RGB")
    else:
        image = rgb.convert(mode)
        reference = image.convert("RGB") if mode not in ("RGBA", "LA") else image.convert("RGB")
    path = tmp_path / ("image.tiff" if mode in ("I", "F", "CMYK", "PA") else "image.png")
    image.save(path)
    loaded = processor.load_images(str(path))
    assert loaded.mode == "RGB" and loaded.width * loaded.height <= processor.size.longest_edge
    ours = processor(str(path), return_tensors="pt")
    expected = processor(reference, return_tensors="pt")
    assert ours["image_grid_thw"].tolist() == expected["image_grid_thw"].tolist()
    assert (ours["pixel_values"] - expected["pixel_values"]).abs().mean() < 0.05, mode


def test_exif_orientation_survives_shrinking(processor, tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored landscape, shown portrait
    for suffix in (".tiff", ".png", ".jpg"):
        path = tmp_path / f"rotated{suffix}"
        Image.new("RGB", (1200, 600), (200, 30, 30)).save(path, exif=exif)
        loaded = processor.load_images(str(path))
        assert loaded.height > loaded.width, suffix


def load_in_fresh_process(path, tmp_path, extra=""):
    """`from_pretrained` as a user runs it: a new interpreter without the project on its path."""
    code = ("from transformers import AutoModelForImageClassification as A\n"
            f"A.from_pretrained({str(path)!r}, trust_remote_code=True{extra})")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_checkpoint_problems_are_reported(tiny_checkpoint, tmp_path):
    no_weights = shutil.copytree(tiny_checkpoint, tmp_path / "no-weights")
    os.remove(no_weights / "model.safetensors")
    no_code = shutil.copytree(tiny_checkpoint, tmp_path / "no-code")
    os.remove(no_code / "modeling_emovlm_kd.py")
    cases = [
        (no_weights, "", "model.safetensors"),
        (no_code, "", "modeling_emovlm_kd.py"),
        (tiny_checkpoint, ", id2label={i: str(i) for i in range(5)}", "size mismatch"),
    ]
    for path, extra, message in cases:
        result = load_in_fresh_process(path, tmp_path, extra)
        assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]


def test_weights_load_from_safetensors_only(tiny_checkpoint, tmp_path):
    pickled = shutil.copytree(tiny_checkpoint, tmp_path / "pickled")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    with pytest.raises(OSError, match="safetensors"):
        EmoVLMKDForImageClassification.from_pretrained(pickled)
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForImageClassification.from_pretrained(pickled, trust_remote_code=True)


IMPORT_AUDIT = textwrap.dedent(
    """
    import importlib.util, json, sys
    events = []
    WATCH = ("socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn")

    def hook(event, args):
        if event in WATCH or (event == "open" and len(args) > 1 and isinstance(args[1], str)
                              and any(m in args[1] for m in "wax+")):
            events.append([event, str(args[0])[:200]])

    import transformers, torch, PIL, numpy  # the libraries may do what they like at import
    from transformers import AutoModelForImageTextToText, PreTrainedModel  # noqa: F401
    sys.addaudithook(hook)
    spec = importlib.util.spec_from_file_location("payload", sys.argv[1] + "/__init__.py",
                                                  submodule_search_locations=[sys.argv[1]])
    module = importlib.util.module_from_spec(spec)
    sys.modules["payload"] = module
    for name in ("configuration_emovlm_kd", "processing_emovlm_kd", "modeling_emovlm_kd", "pipeline_emovlm_kd",
                 "fast_path", "fusion", "backbones", "inference", "loading_emovlm_kd"):
        importlib.import_module("payload." + name)
    print(json.dumps(events))
    """
)


def test_payload_modules_only_define_classes_at_import(tiny_checkpoint, tmp_path):
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "__init__.py").write_text("")
    for name in ("configuration_emovlm_kd.py", "processing_emovlm_kd.py", "modeling_emovlm_kd.py",
                 "pipeline_emovlm_kd.py", "fast_path.py", "fusion.py", "backbones.py", "inference.py",
                 "loading_emovlm_kd.py"):
        shutil.copy(tiny_checkpoint / name, payload / name)
    result = subprocess.run([sys.executable, "-c", IMPORT_AUDIT, str(payload)], capture_output=True, text=True,
                            check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    events = json.loads(result.stdout.strip().splitlines()[-1])
    assert events == []
