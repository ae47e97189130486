"""Publish a finished run to the Hugging Face Hub with a rendered model card: `python -m train push`.

    python -m train push --run-dir runs/emoset-qwen2-vl-7b --variant emoset --repo-id my-org/emovlm-kd-emoset
    python -m train push --config train/recipes/qwen2-vl-7b/fi.yaml --variant fi --repo-id my-org/emovlm-kd-fi --private
    python -m train push --run-dir runs/demo --variant custom --repo-id me/emovlm-kd-demo --dry-run /tmp/to-upload
    python -m train push --run-dir RUN --variant emoset --repo-id ORG/NAME --space ORG/NAME-demo --example-images a.jpg b.jpg
    python -m train push --run-dir RUN --variant emoset --repo-id ORG/NAME --eval-results eval/fi/results.json

The run's Hub-ready folder (`<run>/final`: safetensors weights, `config.json` with `auto_map`, the remote-code and
processor files, `results.json`, `confusion_matrix.png`) is uploaded with its model card (`README.md`, rendered by
`train/commands/card.py`). Next to them go `handler.py` (the Inference Endpoints custom handler, from
`modeling_emovlm_kd/`), a `requirements.txt` for the endpoint, and example images under `examples/` that the card's
`widget:` shows (`--example-images`, or for a `custom` run on an image folder the first test image of up to four
labels; never automatically for the named data sets, whose images are their owners'). `--space ORG/NAME-demo` links
the card to the Space that `python -m train push-space` publishes. `--eval-results` (repeatable) adds the
results.json of `python -m train evaluate-model` on this model as a further model-index entry (its data set and
split) and uploads it under `evaluations/`. JSON files lose any local path they record (`_name_or_path`).

A push writes these files into a staging folder and commits that folder in one `HfApi.create_commit`: files of an
earlier push that this one lacks (another shard layout, examples of other labels) are deleted in the same commit,
so the repo holds exactly the staged files (and its `.gitattributes`). `--dry-run DIR` writes the same staging
folder into DIR and stops. Not `upload_folder(delete_patterns="*")`: with `hf_xet` installed (a dependency of
huggingface-hub 2.x) it commits in batches and splits a batch whose commit fails into several commits, so a push
could land half; one `create_commit` is atomic, and `parent_commit` makes it fail instead of overwriting a push that
happened meanwhile (the deletions were computed from the commit before it). Older revisions stay loadable by their
commit hash. The token comes from the usual places (`HF_TOKEN`, `hf auth login`).

Pinning the revision. `trust_remote_code=True` runs the repository's code, so the card's snippets pass `revision=`.
A commit's hash covers every file in it, README.md included, so no card can name the hash of its own commit. A
second commit that writes the first one's hash into README.md would make the push two steps (a failure between
them leaves a card without a pin, and a concurrent push could land between them) and would double the history.
So a push stays one atomic commit: the snippets name the branch pushed to (`revision="main"` or `--revision`),
the card tells the reader to replace it with the commit hash they reviewed (shown on the Hub), and the push prints
the snippet with the new commit's hash. `push-space` resolves and pins that hash in the Space by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)

from train.commands.card import (
    Evaluation,
    HubFolder,
    PublishError,
    build_card,
    check_card,
    load_evaluations,
    load_variants,
)
from train.infra import registry
from train.infra import run as run_folder  # the run folder's light readers (no torch)
from train.infra.files import public_json

logger = logging.getLogger(__name__)

# Shipped from `modeling_emovlm_kd/` with every push: Inference Endpoints load `EndpointHandler` from it.
HANDLER_FILE = "handler.py"
EXAMPLES_FOLDER = "examples"
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_EXAMPLES, MAX_EXAMPLE_BYTES, DEFAULT_EXAMPLES = 8, 5 * 1024 * 1024, 4


# ---- what gets uploaded ----------------------------------------------------------------------------------------


def folder_files(folder: Path) -> dict[str, Path]:
    """Files of the folder to upload, by path in the repo: all but hidden files, caches and a stale README."""
    files = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if not path.is_file() or relative == "README.md":
            continue
        if any(part.startswith(".") or part == "__pycache__" for part in relative.split("/")):
            continue
        files[relative] = path
    return files


def package_dir() -> Path:
    """The folder of the `modeling_emovlm_kd` package (found without importing it, which would load torch)."""
    spec = importlib.util.find_spec("modeling_emovlm_kd")
    return Path(next(iter(spec.submodule_search_locations)))


def safe_name(text: str) -> str:
    """A file or folder name for the repo: letters, digits, `.`, `_` and `-` only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "image"


def run_examples(folder: HubFolder, limit: int = DEFAULT_EXAMPLES) -> list[tuple[str, Path]]:
    """(title, file): the first test image of each of the first `limit` labels of a run on an image folder.

    Read from the run's own `recipe.yaml` (it holds the data root; results.json's recipe does not), so only a
    folder inside a run (`<run>/final`) with a `root/test/<label>/` layout has them.
    """
    recipe = run_folder.stored_recipe(folder.path.parent) if folder.path.name == "final" else None
    if recipe is None:
        return []
    data = recipe.get("data") or {}
    if str(data.get("kind", "")).lower() != "imagefolder" or not data.get("root"):
        return []
    test = Path(str(data["root"])) / "test"
    examples = []
    for label in folder.labels[:limit]:
        label_dir = test / label
        images = sorted(p for p in label_dir.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES) \
            if label_dir.is_dir() else []
        if images:
            examples.append((label, images[0]))
    return examples


def given_examples(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(title, file) for `--example-images`: image files, or folders whose images are taken in sorted order."""
    examples = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXAMPLE_SUFFIXES)
            if not files:
                raise PublishError(f"--example-images: {path} holds no {'/'.join(EXAMPLE_SUFFIXES)} images.")
        elif path.is_file():
            files = [path]
        else:
            raise PublishError(f"--example-images: {path} does not exist.")
        examples += [(file.stem, file) for file in files]
    return examples


def example_files(examples: list[tuple[str, Path]]) -> dict[str, tuple[str, Path]]:
    """Path in the repo (`examples/<title>/<file>`, the layout app.py reads) -> (title, file), checked."""
    if len(examples) > MAX_EXAMPLES:
        raise PublishError(f"{len(examples)} example images; the card's widget takes at most {MAX_EXAMPLES}.")
    files = {}
    for title, path in examples:
        if path.suffix.lower() not in EXAMPLE_SUFFIXES:
            raise PublishError(f"Example image {path} is not one of {', '.join(EXAMPLE_SUFFIXES)}.")
        if path.stat().st_size > MAX_EXAMPLE_BYTES:
            raise PublishError(f"Example image {path} is over {MAX_EXAMPLE_BYTES // 2**20} MB.")
        in_repo = f"{EXAMPLES_FOLDER}/{safe_name(title)}/{safe_name(path.stem)}{path.suffix.lower()}"
        if in_repo in files:
            raise PublishError(f"Two example images would be uploaded as {in_repo}; rename one.")
        files[in_repo] = (title, path)
    return files


def endpoint_requirements(min_transformers: str) -> bytes:
    """`requirements.txt` of the repo: what an Inference Endpoint installs before it imports handler.py."""
    return ("# Installed by Hugging Face Inference Endpoints before loading handler.py (the endpoint's image brings\n"
            "# torch). The remote code needs transformers 5.x; this is the oldest version it is tested with.\n"
            f"transformers>={min_transformers}\npillow\n").encode()


def published(path: Path) -> Path | bytes:
    """A file of the folder as uploaded: unchanged, unless it is JSON that records a local path (then rewritten)."""
    return (public_json(path) or path) if path.suffix == ".json" else path


def upload_plan(folder: HubFolder, card, examples: dict[str, tuple[str, Path]] | None = None,
                evaluations: list[Evaluation] = (), min_transformers: str | None = None) -> dict[str, Path | bytes]:
    """Path in the repo -> local file or bytes: the folder's files, the endpoint's handler.py and requirements.txt,
    the example images, the further evaluations' results and the rendered README.md, nothing else."""
    plan: dict[str, Path | bytes] = {in_repo: published(path) for in_repo, path in folder_files(folder.path).items()}
    plan[HANDLER_FILE] = package_dir() / HANDLER_FILE
    plan["requirements.txt"] = endpoint_requirements(min_transformers or load_variants()["common"]["min_transformers"])
    plan.update({in_repo: path for in_repo, (_, path) in (examples or {}).items()})
    plan.update({f"evaluations/{safe_name(e.dataset_name)}-{e.split}.json": published(e.path) for e in evaluations})
    plan["README.md"] = str(card).encode()
    return dict(sorted(plan.items()))


def stage(plan: dict[str, Path | bytes], destination: str | Path, link: bool = False) -> Path:
    """Write a plan's files into `destination`, the folder a push commits (or a dry run leaves to inspect); refuses a
    non-empty folder, so that nothing else mixes in. `link` hard-links unchanged files where it can (a push's
    temporary staging folder: no copy of the weights), otherwise they are copied."""
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise PublishError(f"{destination} is not empty; give --dry-run a new or empty folder.")
    for path_in_repo, source in plan.items():
        target = destination / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, bytes):
            target.write_bytes(source)
            continue
        if link:
            with contextlib.suppress(OSError):  # another file system, or one without hard links: copy instead
                os.link(source, target)
                continue
        shutil.copy2(source, target)
    return destination


@contextlib.contextmanager
def staging_folder(near: Path) -> Iterator[Path]:
    """A temporary staging folder beside `near` (same file system, so `stage(link=True)` links), else in the
    system's temporary folder."""
    try:
        folder = tempfile.mkdtemp(prefix=".push-", dir=near)
    except OSError:
        folder = tempfile.mkdtemp(prefix="emovlm-push-")
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_staged(folder: Path, title: str) -> None:
    """The dry run's listing: each staged file with its size."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    print(f"Dry run: the {len(files)} files {title} are in {folder}:")
    for path in files:
        print(f"  {path.relative_to(folder).as_posix():<32} {path.stat().st_size:>12,} bytes")


# ---- talking to the Hub ----------------------------------------------------------------------------------------


def authenticate(api: HfApi) -> dict:
    """`whoami`, turned into messages that say where the token came from and what to do."""
    try:
        user = api.whoami()
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to push.") from None
    except LocalTokenNotFoundError:
        raise PublishError("No Hugging Face token found: set HF_TOKEN or run `hf auth login` "
                           "(a token with write access, https://huggingface.co/settings/tokens).") from None
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise PublishError(f"The Hub at {api.endpoint} rejected the token: {error}".rstrip(".") +
                               ". Set HF_TOKEN to a valid write token or run `hf auth login --force`.") from None
        raise
    role = ((user.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise PublishError(f"The token of {user.get('name')} is read-only; pushing needs a token with write access.")
    return user


def commit_folder(api: HfApi, repo_id: str, folder: Path, parent_commit: str, revision: str = "main",
                  repo_type: str = "model", **commit) -> CommitInfo:
    """One commit on top of `parent_commit` that makes `repo_id@revision` hold exactly the files of `folder`: a file
    of an earlier push that this one lacks (another shard layout, say) would otherwise be loaded along with the new
    files, so it is deleted in the same commit. `.gitattributes` belongs to the repo, not the push."""
    staged = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    remote = set(api.list_repo_files(repo_id, repo_type=repo_type, revision=parent_commit))
    operations = [CommitOperationDelete(path) for path in sorted(remote - set(staged) - {".gitattributes"})]
    operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in staged]
    return api.create_commit(repo_id, operations, repo_type=repo_type, revision=revision,
                             parent_commit=parent_commit, **commit)


def hub_write_error(error: Exception, target: str, conflict: str) -> Exception:
    """A `PublishError` for what a user can act on (no access, refused write, a concurrent push: `conflict`), or
    the Hub's own error for anything else."""
    if isinstance(error, RepositoryNotFoundError):
        return PublishError(f"Cannot reach {target} with this token: {error}")
    status = error.response.status_code if getattr(error, "response", None) is not None else None
    if status in (401, 403):
        return PublishError(f"The Hub refused to write to {target} (HTTP {status}): {error}")
    if status == 412:
        return PublishError(conflict)
    return error


def push(
    run_dir: str | Path,
    variant: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dataset_name: str | None = None,
    dry_run: str | Path | None = None,
    token: str | None = None,
    space: str | None = None,
    example_images: list[str | Path] | None = None,
    eval_results_files: list[str | Path] | None = None,
):
    """Upload a run's Hub-ready folder and its card in one commit; with `dry_run`, stage them there instead.

    `example_images` (files or folders) become the card's widget examples; without them, a `custom` run on an
    image folder contributes its first test images. `eval_results_files` (results.json files of `python -m train
    evaluate-model` on this model) add one model-index entry each and are uploaded under `evaluations/`. Returns the
    `CommitInfo` of the push, or the dry-run folder.
    """
    folder = HubFolder.load(run_dir)
    if example_images:
        chosen = given_examples(example_images)
    else:
        chosen = run_examples(folder) if variant == "custom" else []
    examples = example_files(chosen)
    evaluations = load_evaluations(eval_results_files or [], folder, load_variants(), variant, dataset_name)
    card = build_card(folder, variant, repo_id, dataset_name, revision=revision, space=space, examples=examples,
                      evaluations=evaluations)
    check_card(card, folder, evaluations)
    plan = upload_plan(folder, card, examples, evaluations)
    if dry_run is not None:
        return stage(plan, dry_run)

    api = HfApi(token=token)
    user = authenticate(api)
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.repo_info(repo_id, revision=branch)
        if private and not info.private:
            logger.warning("%s already exists and is public: --private only applies to new repos.", repo_id)
        with staging_folder(folder.path.parent) as staged:
            return commit_folder(
                api, repo_id, stage(plan, staged, link=True), info.sha, branch,
                commit_message=commit_message or f"Upload EmoVLM-KD ({variant}) from {folder.path.parent.name}",
                commit_description=f"Pushed by {user.get('name')} with `python -m train push --variant {variant}`.",
            )
    except (RepositoryNotFoundError, HfHubHTTPError) as error:
        raise hub_write_error(error, repo_id, f"{repo_id}@{branch} changed while pushing (someone else pushed); "
                                             "nothing was committed. Run the push again.") from None


# ---- command line ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `python -m train push` subcommand's arguments."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="The run's output_dir (or its final/ folder).")
    source.add_argument("--config", help="The run's YAML recipe; its output_dir is the run.")
    parser.add_argument("--variant", required=True, choices=registry.card_variants(),
                        help="Data set the model was trained on; sets the card's metadata and checks the labels.")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME of the model repo (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private.")
    parser.add_argument("--revision", help="Branch to push to (created from main if missing); default main.")
    parser.add_argument("--commit-message", help="Commit title; default names the variant and the run.")
    parser.add_argument("--dataset-name", help="Data set name on the card (custom variant; default from the recipe).")
    parser.add_argument("--space", metavar="ORG/NAME", help="Link the card to this demo Space (`push-space`).")
    parser.add_argument("--example-images", nargs="+", metavar="PATH",
                        help=f"Images (files or folders, at most {MAX_EXAMPLES}) uploaded to examples/ for the "
                             "card's widget; default for a custom run on an image folder: its first test images.")
    parser.add_argument("--eval-results", action="append", metavar="RESULTS_JSON",
                        help="results.json of `python -m train evaluate-model` on this model: one more model-index "
                             "entry (its data set and split); repeat for several.")
    parser.add_argument("--dry-run", metavar="DIR", help="Write the files that would be uploaded into DIR instead.")
    return parser


def main(args: argparse.Namespace) -> None:
    """Run `push` from parsed arguments; user errors exit with status 1 and a message, without a traceback."""
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = (yaml.safe_load(Path(args.config).read_text()) or {}).get("output_dir")
        if not run_dir:
            sys.exit(f"push: error: {args.config} has no output_dir.")
    try:
        result = push(run_dir, args.variant, args.repo_id, private=args.private, revision=args.revision,
                      commit_message=args.commit_message, dataset_name=args.dataset_name, dry_run=args.dry_run,
                      space=args.space, example_images=args.example_images,
                      eval_results_files=args.eval_results)
    except PublishError as error:
        sys.exit(f"push: error: {error}")
    if args.dry_run is not None:
        return print_staged(result, f"that would be pushed to {args.repo_id}")
    print(f"Pushed to {args.repo_id}@{args.revision or 'main'}: commit {result.oid}\n  {result.commit_url}\n"
          f"Load exactly this commit (the card names the branch; pin the hash):\n"
          f"  pipeline('image-classification', model={args.repo_id!r}, revision={result.oid!r}, "
          f"trust_remote_code=True)"
          + (f"\nor follow the branch with revision={args.revision!r}" if args.revision else ""))


__all__ = [
    "add_arguments",
    "authenticate",
    "commit_folder",
    "example_files",
    "hub_write_error",
    "main",
    "push",
    "stage",
    "upload_plan",
]
