"""The typed recipe: every mistake fails at start with the `section.key`, before any stage runs or anything is
deleted; overrides all apply; the help lists every field; what leaves the machine has no secret or local path."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.__main__ import parse_args
from train.infra.recipe import RecipeError, load_recipe, public_recipe, recipe_help, validate_recipe

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "train" / "recipes" / "tiny" / "demo.yaml"


@pytest.mark.parametrize("override, message", [
    ("sft.learnin_rate=1e-3", r"unknown key sft\.learnin_rate \(did you mean 'learning_rate'\?\)\. Allowed keys of "
                              r"'sft': .*learning_rate"),
    ("distill.alpah=0.3", r"unknown key distill\.alpah.*Allowed keys of 'distill': .*alpha"),
    ("teacher.crop_scal=0.5", r"unknown key teacher\.crop_scal.*crop_scale"),
    ("gate.lr=1", r"unknown key gate\.lr\b"),
    ("model.gate=moe", r"unknown key model\.gate\b.*gate_type"),
    ("modle.gate_type=moe", r"unknown section 'modle' \(did you mean 'model'\?\)"),
    ("distil.alpha=0.1", r"unknown section 'distil' \(did you mean 'distill'\?\)"),
    ("seeed=3", r"unknown section 'seeed' \(did you mean 'seed'\?\)"),
    ("sft.num_train_epochs=ten", r"sft\.num_train_epochs: expected a number, got 'ten'"),
    ("teacher.per_device_train_batch_size=many", r"teacher\.per_device_train_batch_size: expected an integer"),
    ("sft.use_peft=maybe", r"sft\.use_peft: expected true or false"),
    ("distill.alpha=1.5", r"distill\.alpha: must be a finite number in \[0, 1\], got 1\.5"),
    ("gate.learning_rate=[1]", r"gate\.learning_rate: expected a number"),
    ("model.gate_type=linear", r"model: gate_type must be one of"),
    ("model.head_hidden_dims=wide", r"model\.head_hidden_dims: expected a list"),
    ("data.kind=emoset2", r"data\.kind: unknown data set kind 'emoset2'"),
    ("data.label_file=votes.txt", r"data\.label_file is not an option of data kind 'imagefolder'"),
    ("instructions.generator=gpt", r"instructions\.generator must be one of openai, local, none"),
    ("instructions.api_key=sk-abc", r"instructions\.api_key is not an option of generator 'none'"),
    ("seed=one", r"seed: expected an integer"),
    ("instructions.num_workers=0", r"instructions\.num_workers: must be an integer >= 1, got 0"),
    ("model.preprocess_workers=-1", r"model\.preprocess_workers: must be an integer >= 0, got -1"),
    ("model.preprocess_workers=two", r"model\.preprocess_workers: expected an integer"),
])
def test_recipe_mistakes_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(DEMO, [override])


def test_values_are_converted_as_yaml_and_set_means_set():
    recipe = load_recipe(DEMO, ["sft.learning_rate=1e-3", "distill.num_train_epochs=3", "model.pooling=max"])
    assert recipe.sft.learning_rate == 1e-3 and recipe.as_set["sft"]["learning_rate"] == 1e-3
    assert recipe.distill.num_train_epochs == 3.0 and recipe.distill.alpha == 0.5
    assert recipe.model.pooling == "max"
    assert recipe.sft.output_dir == str(Path("runs/demo") / "sft")


def test_every_shipped_recipe_validates():
    for path in sorted((ROOT / "train" / "recipes").glob("*/*.yaml")):
        if path.parent.name == "accelerate":
            continue
        # The 7B recipes train in bf16, which TrainingArguments accepts only on a GPU or with use_cpu.
        overrides = [] if path == DEMO else [f"{s}.use_cpu=true" for s in ("sft", "teacher", "distill", "gate")]
        recipe = load_recipe(path, overrides)
        assert recipe.labels, path


def test_every_set_applies_in_order():
    args = parse_args(["pipeline", "--config", str(DEMO), "--set", "seed=1", "--set", "distill.alpha=0.2",
                       "gate.learning_rate=0.1", "--set", "seed=3"])
    recipe = load_recipe(args.config, args.set)
    assert recipe.seed == 3 and recipe.distill.alpha == 0.2
    assert recipe.gate.learning_rate == 0.1


def test_a_bad_recipe_fails_at_once_with_exit_2_and_deletes_nothing(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "merged").mkdir(parents=True)
    (run / "sft" / "stage_done.json").write_text("{}")
    for command in ("sft", "distill", "pipeline"):
        result = subprocess.run(
            [sys.executable, "-m", "train", command, "--config", str(DEMO), "--output-dir", str(run),
             "--set", "sft.learnin_rate=1e-3"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert "unknown key sft.learnin_rate" in result.stderr and "Traceback" not in result.stderr
        assert (run / "sft" / "merged").is_dir() and (run / "sft" / "stage_done.json").exists()


def test_recipe_help_lists_every_field_with_help_and_default():
    text = recipe_help()
    for line in ("  alpha (float, default 0.5)  Weight of the KL term",
                 "  temperature (float, default 2.0)  Softmax temperature",
                 "  lora_target_modules (list[str], default ['q_proj', 'k_proj', 'v_proj'])",
                 "  gate_type (str, default 'concat_linear')",
                 "  vlm (str, default 'Qwen/Qwen2-VL-7B-Instruct')",
                 "  teacher (str, default 'google/vit-base-patch16-384')",
                 "  learning_rate (float, default 0.0001)  AdamW learning rate."):
        assert line in text, line
    result = subprocess.run([sys.executable, "-m", "train", "recipe", "--help"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 0 and "alpha (float, default 0.5)" in result.stdout
    assert "crop_scale (float, default 0.7)" in result.stdout


def test_recipe_command_validates_and_prints_the_public_recipe(tmp_path):
    recipe = yaml.safe_load(DEMO.read_text())
    recipe["instructions"] = {"generator": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m",
                              "api_key": "sk-live-0123456789abcdef"}
    recipe["data"]["root"] = str(tmp_path / "photos")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = subprocess.run([sys.executable, "-m", "train", "recipe", "--config", str(path)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    header, _, printed = result.stdout.partition("\n")
    assert header.endswith("valid. As stored in results.json (secrets and local paths removed):")
    assert "sk-live" not in printed and str(tmp_path) not in printed and "<redacted>" in printed


def test_public_recipe_removes_secrets_and_local_paths(tmp_path):
    run = tmp_path / "run"
    recipe = {
        "output_dir": str(run), "labels": "binary",
        "data": {"kind": "flickr", "root": "/data/flickr", "label_file": "votes.txt",
                 "split_file": str(run / "split.json")},
        "instructions": {"generator": "openai", "api_key": "sk-test-123456789", "base_url": "http://10.1.2.3/v1",
                         "model": "gpt"},
        "sft": {"hub_token": "hf_abcdefghijklmnop", "learning_rate": 1e-4, "run_name": "Bearer abc.def-123",
                "logging_dir": "~/logs", "report_to": ["wandb"]},
        "teacher": {"password_file": "x", "client_secret": None, "deepspeed": "C:\\configs\\ds.json"},
    }
    public = public_recipe(recipe, run)
    text = yaml.safe_dump(public)
    for secret in ("sk-test-123456789", "hf_abcdefghijklmnop", "Bearer abc", "/data/flickr", str(run), "~/logs",
                   "C:\\configs"):
        assert secret not in text, secret
    assert public["instructions"]["api_key"] == "<redacted>" and public["sft"]["hub_token"] == "<redacted>"
    assert public["sft"]["run_name"] == "<redacted>" and "logging_dir" not in public["sft"]
    assert public["data"] == {"kind": "flickr", "label_file": "votes.txt", "split_file": "split.json",
                              "root_name": "flickr"}
    assert "output_dir" not in public and public["sft"]["learning_rate"] == 1e-4
    assert public["teacher"]["password_file"] == "<redacted>"
    assert "client_secret" not in public["teacher"]  # unset secrets are left out, not marked


def test_a_validated_recipe_revalidates_to_the_same_values():
    recipe = load_recipe(DEMO, ["seed=5"])
    again = validate_recipe(recipe.as_set)
    assert again.as_set == recipe.as_set


def test_a_recipe_inherits_from_its_bases_and_states_only_what_differs(tmp_path):
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "paper.yaml").write_text(yaml.safe_dump({
        "seed": 1, "model": {"head_hidden_dims": [8, 4], "pooling": "max"}, "sft": {"lora_r": 4, "lora_alpha": 4}}))
    (tmp_path / "bases" / "backbone.yaml").write_text(yaml.safe_dump({
        "base": "paper.yaml", "model": {"head_hidden_dims": [16]}, "base_models": {"tiny": True}}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "base": ["bases/backbone.yaml"], "output_dir": str(tmp_path / "run"), "labels": "binary",
        "data": {"kind": "imagefolder", "root": "x"}, "sft": {"lora_alpha": 2}}))
    recipe = load_recipe(tmp_path / "run.yaml", ["sft.lora_r=16"])
    # Sections merge key by key; a list replaces the base's; the file wins over its bases, --set over everything.
    assert recipe.as_set["model"] == {"head_hidden_dims": [16], "pooling": "max"}
    assert recipe.as_set["sft"] == {"lora_r": 16, "lora_alpha": 2} and recipe.seed == 1
    assert recipe.model.head_hidden_dims == [16] and recipe.base_models.tiny and "base" not in recipe.as_set
    (tmp_path / "bases" / "paper.yaml").write_text(yaml.safe_dump({"base": "../run.yaml", "seed": 1}))
    with pytest.raises(RecipeError, match=r"run\.yaml is its own base"):
        load_recipe(tmp_path / "run.yaml")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"base": [3], "output_dir": "x"}))
    with pytest.raises(RecipeError, match=r"bad\.yaml: base: expected a path or a list of paths, got 3"):
        load_recipe(tmp_path / "bad.yaml")
    assert "base (optional)  A recipe file, or a list of them" in recipe_help()


def test_the_model_sections_config_options_default_to_the_configs():
    from modeling_emovlm_kd import EmoVLMKDConfig
    from train.infra.recipe import ModelSection

    assert ModelSection.CONFIG_KEYS == (
        "head_hidden_dims", "head_activation", "head_dropout", "pooling", "gate_type", "gate_vlm_signal",
        "gate_head_signal", "gate_num_experts", "categorical_prompt", "conversation_prompt", "reasoning_prompt")
    section, config = ModelSection(), EmoVLMKDConfig.from_label_set("binary")
    for key in ModelSection.CONFIG_KEYS:
        if key.endswith("_prompt"):
            assert getattr(section, key) is None  # unset: the config fills in the paper's wording
        else:
            assert getattr(section, key) == (list(config.head_hidden_dims) if key == "head_hidden_dims"
                                             else getattr(config, key)), key
