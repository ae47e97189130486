"""Publish the demo app (`app.py`) as a Hugging Face Space for a pushed model: `python -m train push-space`.

    python -m train push-space --model my-org/emovlm-kd-emoset --space my-org/emovlm-kd-emoset-demo
    python -m train push-space --model me/emovlm-kd-demo --space me/emovlm-kd-demo-app --dry-run /tmp/space

The Space gets, in one commit:

- `app.py`, the project's Gradio app, unchanged;
- `README.md` with the Space's configuration (`sdk: gradio`, `sdk_version` and `python_version` as tested,
  `app_file: app.py`, `models: [MODEL]`, so the model page lists the Space), rendered from
  `hub_cards/space_README.md.j2`;
- `requirements.txt`, pinned to `requirements/constraints.txt` (torch as its CPU wheel from PyTorch's index: a
  Space runs on CPU unless given a GPU; gradio is installed by the Space from `sdk_version`);
- `emovlm_space.json`: the model id and the **commit hash** of the model's `--model-revision` (default `main`),
  resolved through the Hub API when the Space is pushed, so the app loads exactly that commit, remote code included,
  whatever is pushed to the model later; and the examples folder;
- `examples/<title>/<image>`: `--examples DIR` (`<label>/<image>` files), or else the example images the model
  repository carries at that commit (`python -m train push` uploads them for the card's widget).

As for `python -m train push`, the files are written into a staging folder, which one commit makes the Space's whole
content: files of an earlier push-space that this one lacks are deleted in the same commit. `--dry-run DIR` writes the
staging folder into DIR and stops; it still asks the Hub (read only) for the model's commit. The token comes from
`HF_TOKEN` or `hf auth login`. Link the model card to the Space with `python -m train push ... --space ORG/NAME-demo`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
from pathlib import Path

import yaml
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from train.commands.card import CARDS_DIR, PublishError, render_template
from train.commands.publish import (
    EXAMPLE_SUFFIXES,
    EXAMPLES_FOLDER,
    MAX_EXAMPLES,
    authenticate,
    commit_folder,
    hub_write_error,
    print_staged,
    safe_name,
    stage,
)

logger = logging.getLogger(__name__)

ROOT = CARDS_DIR.parent  # app.py and requirements/ sit next to the packages in the source tree
APP_FILE = ROOT / "app.py"
CONSTRAINTS = ROOT / "requirements" / "constraints.txt"
TEMPLATE_PATH = CARDS_DIR / "space_README.md.j2"
SETTINGS_FILE = "emovlm_space.json"  # app.py's SPACE_SETTINGS (a test checks they agree)
# What app.py and the model's remote code import; gradio comes from the Space's sdk_version.
SPACE_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "pillow", "numpy")
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
MODEL_TYPE = "emovlm_kd"
SHA = re.compile(r"^[0-9a-f]{40}$")


def pinned_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """`name==version` lines of requirements/constraints.txt, by lower-case name."""
    versions = {}
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if "==" in requirement:
            name, version = (part.strip() for part in requirement.split("==", 1))
            versions[name.lower()] = version
    return versions


def space_requirements(versions: dict[str, str]) -> bytes:
    missing = [name for name in (*SPACE_PACKAGES, "gradio") if name not in versions]
    if missing:
        raise PublishError(f"{CONSTRAINTS} pins no version of {missing}.")
    torch_version = versions["torch"].split("+")[0]
    lines = [
        "# The versions EmoVLM-KD is tested with (requirements/constraints.txt). gradio is installed by the Space",
        f"# itself (sdk_version {versions['gradio']} in README.md). torch is its CPU wheel, from PyTorch's index:",
        "# the Space runs on CPU; on GPU hardware, replace the two torch lines with a CUDA build of the same version.",
        f"--extra-index-url {TORCH_CPU_INDEX}",
        f"torch=={torch_version}+cpu",
        *(f"{name}=={versions[name]}" for name in SPACE_PACKAGES if name != "torch"),
    ]
    return ("\n".join(lines) + "\n").encode()


def space_readme(model: str, space: str, revision: str, versions: dict[str, str], examples: list[str],
                 examples_source: str | None, endpoint: str) -> bytes:
    title = space.split("/")[-1]
    front_matter = {
        "title": title,
        "emoji": "🎭",
        "colorFrom": "blue",
        "colorTo": "yellow",
        "sdk": "gradio",
        "sdk_version": versions["gradio"],
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
        "app_file": "app.py",
        "models": [model],
        "license": "apache-2.0",
        "short_description": "EmoVLM-KD: VLM, distilled head and gate, side by side",
        "pinned": False,
    }
    text = render_template(
        TEMPLATE_PATH, front_matter=yaml.safe_dump(front_matter, sort_keys=False, allow_unicode=True).strip(),
        title=title, model=model, space=space, revision=revision, model_url=f"{endpoint.rstrip('/')}/{model}",
        gradio_version=versions["gradio"], examples=examples, examples_source=examples_source,
    )
    return text.encode()


def folder_examples(folder: Path) -> dict[str, Path]:
    """`examples/<label>/<image>` of a `<label>/<image>` folder: the first image of each label, as app.py shows."""
    if not folder.is_dir():
        raise PublishError(f"--examples {folder} is not a folder.")
    examples = {}
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES)
        if images:
            image = images[0]
            examples[f"{EXAMPLES_FOLDER}/{safe_name(label_dir.name)}/{safe_name(image.stem)}{image.suffix.lower()}"] \
                = image
    if not examples:
        raise PublishError(f"--examples {folder} has no <label>/<image> files ({', '.join(EXAMPLE_SUFFIXES)}).")
    if len(examples) > MAX_EXAMPLES:
        examples = dict(list(examples.items())[:MAX_EXAMPLES])
    return examples


def model_examples(api: HfApi, model: str, revision: str, download_dir: Path) -> dict[str, Path]:
    """The model repository's `examples/` images at the pinned commit, downloaded."""
    names = [name for name in api.list_repo_files(model, revision=revision)
             if name.startswith(f"{EXAMPLES_FOLDER}/") and name.lower().endswith(EXAMPLE_SUFFIXES)]
    return {name: Path(hf_hub_download(model, name, revision=revision, local_dir=download_dir, token=api.token))
            for name in sorted(names)[:MAX_EXAMPLES]}


def resolve_model(api: HfApi, model: str, revision: str) -> str:
    """The commit hash of `model@revision`, after checking that it is an EmoVLM-KD model."""
    try:
        info = api.model_info(model, revision=revision)
        config = json.loads(Path(hf_hub_download(model, "config.json", revision=info.sha, token=api.token))
                            .read_text())
    except RevisionNotFoundError:
        raise PublishError(f"{model} has no revision {revision!r}.") from None
    except RepositoryNotFoundError:
        raise PublishError(f"Model {model} not found on {api.endpoint} (or not visible with this token); push it "
                           "first with `python -m train push`.") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise PublishError(f"push-space (also --dry-run) asks {api.endpoint} for the commit and config of {model}@"
                           f"{revision}, but HF_HUB_OFFLINE is set: unset it.") from None
    if config.get("model_type") != MODEL_TYPE:
        raise PublishError(f"{model}@{info.sha} is not an EmoVLM-KD model (model_type {config.get('model_type')!r}).")
    if not SHA.match(info.sha or ""):
        raise PublishError(f"The Hub answered no commit hash for {model}@{revision}.")
    return info.sha


def space_plan(api: HfApi, model: str, space: str, revision: str, examples_dir: str | Path | None,
               download_dir: Path) -> tuple[dict[str, Path | bytes], str]:
    """(path in the Space -> file or bytes, the model's pinned commit)."""
    if not APP_FILE.is_file() or not CONSTRAINTS.is_file():
        raise PublishError(f"push-space needs the project's {APP_FILE.name} and {CONSTRAINTS.relative_to(ROOT)}: "
                           "run it from a source checkout (`pip install -e .`).")
    sha = resolve_model(api, model, revision)
    if examples_dir is not None:
        examples, source = folder_examples(Path(examples_dir)), None
    else:
        examples, source = model_examples(api, model, sha, download_dir), f"the model repository at `{sha[:12]}`"
    versions = pinned_versions()
    settings = {"checkpoint": model, "revision": sha, "examples": EXAMPLES_FOLDER if examples else None}
    titles = [name.split("/")[1] for name in examples]
    plan: dict[str, Path | bytes] = {
        "app.py": APP_FILE,
        "README.md": space_readme(model, space, sha, versions, titles, source if examples else None, api.endpoint),
        "requirements.txt": space_requirements(versions),
        SETTINGS_FILE: (json.dumps(settings, indent=2) + "\n").encode(),
        **examples,
    }
    return dict(sorted(plan.items())), sha


def push_space(model: str, space: str, revision: str = "main", examples: str | Path | None = None,
               private: bool = False, dry_run: str | Path | None = None, commit_message: str | None = None,
               token: str | None = None):
    """Push the demo Space for `model` pinned to its current commit; returns (CommitInfo or dry-run folder, sha)."""
    api = HfApi(token=token)
    if dry_run is None:
        user = authenticate(api)
    with tempfile.TemporaryDirectory(prefix="emovlm-space-") as work:
        plan, sha = space_plan(api, model, space, revision, examples, Path(work) / "downloads")
        if dry_run is not None:
            return stage(plan, dry_run), sha
        try:
            api.create_repo(space, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
            info = api.space_info(space)
            result = commit_folder(
                api, space, stage(plan, Path(work) / "space", link=True), info.sha, repo_type="space",
                commit_message=commit_message or f"EmoVLM-KD demo for {model}@{sha[:12]}",
                commit_description=f"Pushed by {user.get('name')} with `python -m train push-space`; the app loads "
                                   f"{model} at commit {sha}.",
            )
        except (RepositoryNotFoundError, HfHubHTTPError) as error:
            raise hub_write_error(error, f"the Space {space}", f"The Space {space} changed while pushing; nothing "
                                                               "was committed. Run it again.") from None
    return result, sha


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `python -m train push-space` subcommand's arguments."""
    parser.add_argument("--model", required=True, help="ORG/NAME of the pushed EmoVLM-KD model.")
    parser.add_argument("--space", required=True, help="ORG/NAME of the Space (created if missing).")
    parser.add_argument("--model-revision", default="main",
                        help="Branch, tag or commit of the model to pin (resolved to its commit hash); default main.")
    parser.add_argument("--examples", metavar="DIR",
                        help="A <label>/<image> folder of example images; default: the model repository's examples/.")
    parser.add_argument("--private", action="store_true", help="Create the Space private.")
    parser.add_argument("--commit-message", help="Commit title; default names the model and its commit.")
    parser.add_argument("--dry-run", metavar="DIR", help="Write the Space's files into DIR instead of pushing.")
    return parser


def main(args: argparse.Namespace) -> None:
    try:
        result, sha = push_space(args.model, args.space, revision=args.model_revision, examples=args.examples,
                                 private=args.private, dry_run=args.dry_run, commit_message=args.commit_message)
    except PublishError as error:
        sys.exit(f"push-space: error: {error}")
    if args.dry_run is not None:
        return print_staged(result, f"of the Space {args.space} ({args.model} pinned to {sha})")
    print(f"Pushed the Space {args.space}: commit {result.oid}\n  {constants.ENDPOINT.rstrip('/')}/spaces/"
          f"{args.space}\nIt loads {args.model} at commit {sha}.")


__all__ = ["add_arguments", "main", "push_space", "space_plan"]
