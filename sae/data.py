"""Text sources and their tokenisation into fixed-length chunks in a fixed, seeded order.

Sources: `embedded` (Python's own documentation: the `pydoc_data` topics and the docstrings
of the standard library's sources, present offline on every CPython install), a local
`.txt` file or folder of them, a `.jsonl` file with a `text` field, or a Hugging Face dataset
name (streamed; needs network).
"""

import ast
import functools
import json
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from sae.errors import UserError

EMBEDDED = "embedded"
# Packages whose sources are tests, demos or vendored code rather than documentation.
_SKIPPED_STDLIB_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"}


@functools.cache
def embedded_documents() -> tuple[str, ...]:
    """Documents of the embedded corpus, in a fixed order."""
    import pydoc_data.topics

    documents = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_STDLIB_PARTS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node)
                if docstring and len(docstring) >= 40:
                    documents.append(docstring)
    return tuple(documents)


def _local_documents(path: Path) -> Iterator[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        if file.suffix == ".jsonl":
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(
                        f"{file}:{number} is not valid JSON: fix or remove that line"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{file}:{number} has no string field 'text': add one")
                yield record["text"]
        else:
            yield file.read_text(encoding="utf-8", errors="replace")


def _hub_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        for record in stream:
            yield record[text_field]
    except (FileNotFoundError, ConnectionError, ValueError, KeyError) as error:
        raise UserError(
            f"cannot stream dataset '{name}' ({str(error).splitlines()[0][:120]}): use "
            "'embedded', a local .txt/.jsonl path, or a dataset reachable from here"
        ) from None


def documents(dataset: str, split: str = "train", text_field: str = "text") -> Iterable[str]:
    """The documents of a source, in a fixed order."""
    if dataset == EMBEDDED:
        return embedded_documents()
    path = Path(dataset).expanduser()
    if path.exists():
        if path.is_file() and path.suffix not in (".txt", ".jsonl"):
            raise UserError(f"{path} is neither .txt nor .jsonl: convert it to one of those")
        return _local_documents(path)
    if dataset.endswith((".txt", ".jsonl")) or dataset.startswith((".", "/", "~")):
        raise UserError(f"dataset file {dataset} does not exist: check the path")
    return _hub_documents(dataset, split, text_field)


def load_chunks(
    dataset: str,
    tokenizer: PreTrainedTokenizerBase,
    chunk_len: int = 256,
    max_tokens: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids (n_chunks, chunk_len), int64, in an order fixed by `seed`.

    Documents are joined with the EOS token and cut into chunks of `chunk_len` tokens; the
    remainder shorter than a chunk is dropped. `max_tokens` caps the tokens read (rounded
    down to whole chunks) before shuffling, so the same cap always gives the same chunks.
    """
    if chunk_len < 2:
        raise UserError(f"chunk length {chunk_len} is too short: use at least 2 tokens")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    limit = None if max_tokens is None else (max_tokens // chunk_len) * chunk_len
    for text in documents(dataset):
        if not text.strip():
            continue
        buffer.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        buffer.extend(separator)
        if limit is not None and len(buffer) >= limit:
            break
    n_chunks = len(buffer) // chunk_len
    if limit is not None:
        n_chunks = min(n_chunks, limit // chunk_len)
    if n_chunks == 0:
        raise UserError(
            f"dataset '{dataset}' has {len(buffer)} tokens, fewer than one chunk of "
            f"{chunk_len}: give more text or a shorter chunk length"
        )
    chunks = torch.tensor(buffer[: n_chunks * chunk_len], dtype=torch.int64).view(n_chunks, -1)
    order = torch.randperm(n_chunks, generator=torch.Generator().manual_seed(seed))
    return chunks[order]
