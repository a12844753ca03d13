"""Tiny built-in pretraining corpus that needs no download.

Two sources, both generated deterministically from a seed:

* natural-ish English: docstrings (via ``ast``) and comments (via ``tokenize``) of the
  installed Python standard library;
* a synthetic task mix with exact answers (multi-digit addition, sequence reversal, digit
  sorting), so a tiny model has something whose learning can be measured by exact match.

Output files in ``out_dir``:

* ``train.jsonl`` / ``valid.jsonl``: one ``{"text": ..., "source": ...}`` per document. Text
  documents are split by *source file*, so no file contributes to both splits.
* ``tasks_heldout.jsonl``: ``{"task", "prompt", "answer"}`` per problem, for exact-match eval.
  ``prompt + answer`` is exactly the line as it would appear in training text; ``prompt`` ends
  with the task marker (``=`` or ``->``). The three problem pools (train / valid / held-out)
  are disjoint, so held-out problems never appear in training.
* ``manifest.json``: the parameters, sizes and a sha256 fingerprint of the three data files.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import io
import json
import os
import random
import sys
import sysconfig
import tokenize
from typing import Callable, Dict, Iterator, List, Optional, Tuple

CORPUS_FORMAT_VERSION = 1

TRAIN_FILE = "train.jsonl"
VALID_FILE = "valid.jsonl"
HELDOUT_FILE = "tasks_heldout.jsonl"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (TRAIN_FILE, VALID_FILE, HELDOUT_FILE)

# Standard-library directories that are tests, vendored third-party code, demos or
# machine-generated tables: they would add noise (or near-duplicate text) to the corpus.
SKIPPED_STDLIB_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "ensurepip",
        "turtledemo",
        "__pycache__",
        "__phello__",
        "pydoc_data",
        "encodings",
    }
)

# Comments that are tooling directives, not prose.
_DIRECTIVE_PREFIXES = ("!", "-*-", "type:", "noqa", "pragma", "pylint", "fmt:", "XXX")


# ----------------------------------------------------------------------------------------------
# Text from the standard library
# ----------------------------------------------------------------------------------------------


def list_stdlib_sources(stdlib_dir: Optional[str] = None) -> List[str]:
    """Return the stdlib ``.py`` files worth reading, as sorted paths relative to the stdlib."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    found = []
    for root, dirs, files in os.walk(stdlib_dir):
        # Prune in place so os.walk never descends into skipped trees; sort for determinism.
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_STDLIB_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if name.endswith(".py") and not name.startswith("test_"):
                found.append(os.path.relpath(os.path.join(root, name), stdlib_dir))
    return found


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STATEMENT_LISTS = ("body", "orelse", "handlers", "finalbody", "cases")


def _docstrings(tree: ast.Module) -> List[Tuple[int, str]]:
    """(line, docstring) of the module and of every class and function in it."""
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append((getattr(node, "lineno", 0), doc.strip()))
        # Definitions only live in statement lists; skipping expressions is what makes this
        # several times faster than ast.walk.
        for field in _STATEMENT_LISTS:
            stack.extend(getattr(node, field, ()))
    return found


def _is_prose_comment(text: str) -> bool:
    if not text or text.startswith(_DIRECTIVE_PREFIXES):
        return False
    # Separator lines such as "#-----" or "# ====" carry no words.
    return any(ch.isalpha() for ch in text)


def _comment_blocks(source: str) -> List[Tuple[int, str]]:
    """(first line, text) of each run of comments on consecutive lines."""
    blocks: List[Tuple[int, List[str]]] = []
    last_line = -2
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type != tokenize.COMMENT:
            continue
        line = tok.start[0]
        text = tok.string.lstrip("#").strip()
        if not _is_prose_comment(text):
            continue
        if line == last_line + 1 and blocks:
            blocks[-1][1].append(text)
        else:
            blocks.append((line, [text]))
        last_line = line
    # A block of a couple of words ("# fall through") teaches little; keep sentences.
    return [(line, " ".join(parts)) for line, parts in blocks if len(" ".join(parts).split()) >= 4]


def extract_source_text(path: str, max_chars: int) -> str:
    """Docstrings and comment blocks of one Python file, in source order ('' if unreadable)."""
    try:
        with tokenize.open(path) as f:  # honours the file's coding declaration
            source = f.read()
        pieces = _docstrings(ast.parse(source)) + _comment_blocks(source)
    except (SyntaxError, ValueError, UnicodeDecodeError, tokenize.TokenError, OSError):
        return ""
    text = ""
    for _, piece in sorted(pieces, key=lambda p: p[0]):
        if len(text) + len(piece) + 2 > max_chars:
            break  # cut at a paragraph boundary rather than mid-sentence
        text = f"{text}\n\n{piece}" if text else piece
    return text


def collect_stdlib_documents(
    rng: random.Random, max_total_chars: int, max_doc_chars: int, min_doc_chars: int = 200
) -> List[Dict[str, str]]:
    """One document per stdlib file, files visited in seeded random order until the cap."""
    stdlib_dir = sysconfig.get_paths()["stdlib"]
    files = list_stdlib_sources(stdlib_dir)
    rng.shuffle(files)  # a seeded sample across the whole stdlib, not just modules a..c
    docs, total = [], 0
    with _gc_paused():
        for rel in files:
            text = extract_source_text(os.path.join(stdlib_dir, rel), max_doc_chars)
            if len(text) < min_doc_chars:
                continue
            if total + len(text) > max_total_chars:
                break
            docs.append({"text": text, "source": f"stdlib:{rel}"})
            total += len(text)
    return docs


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: ast.parse allocates millions of (acyclic) nodes, and the collector
    triggered by those allocations triples the parse time. Reference counting still frees them."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# ----------------------------------------------------------------------------------------------
# Synthetic tasks with exact answers
# ----------------------------------------------------------------------------------------------

# Each generator returns (prompt, answer); prompt + answer is the training line.
TaskGenerator = Callable[[random.Random], Tuple[str, str]]


def _random_number(rng: random.Random, max_digits: int) -> int:
    # Pick the digit count first so short and long operands are equally common.
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def make_addition(max_digits: int = 3) -> TaskGenerator:
    def generate(rng: random.Random) -> Tuple[str, str]:
        a, b = _random_number(rng, max_digits), _random_number(rng, max_digits)
        return f"{a}+{b}=", str(a + b)

    return generate


def make_reversal(min_len: int = 2, max_len: int = 7) -> TaskGenerator:
    letters = "abcdefghijklmnopqrstuvwxyz"

    def generate(rng: random.Random) -> Tuple[str, str]:
        seq = [rng.choice(letters) for _ in range(rng.randint(min_len, max_len))]
        return f"reverse: {' '.join(seq)} ->", " " + " ".join(reversed(seq))

    return generate


def make_digit_sort(min_len: int = 2, max_len: int = 7) -> TaskGenerator:
    def generate(rng: random.Random) -> Tuple[str, str]:
        seq = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
        return f"sort: {' '.join(map(str, seq))} ->", " " + " ".join(map(str, sorted(seq)))

    return generate


DEFAULT_TASKS: Dict[str, TaskGenerator] = {
    "add": make_addition(),
    "reverse": make_reversal(),
    "sort": make_digit_sort(),
}


def sample_unique_problems(generate: TaskGenerator, count: int, rng: random.Random) -> List[Tuple[str, str]]:
    """``count`` problems with pairwise distinct prompts (so pools split from it are disjoint)."""
    seen, problems = set(), []
    for _ in range(count * 50):  # bounded: a too-small problem space fails loudly below
        prompt, answer = generate(rng)
        if prompt not in seen:
            seen.add(prompt)
            problems.append((prompt, answer))
            if len(problems) == count:
                return problems
    raise ValueError(f"could only draw {len(problems)} distinct problems of {count} requested")


def split_task_pools(
    tasks: Dict[str, TaskGenerator], sizes: Tuple[int, int, int], rng: random.Random
) -> Tuple[List[Tuple[str, str, str]], ...]:
    """Disjoint (train, valid, heldout) pools of (task, prompt, answer), sizes per task."""
    pools: Tuple[List[Tuple[str, str, str]], ...] = ([], [], [])
    for name in sorted(tasks):
        problems = sample_unique_problems(tasks[name], sum(sizes), rng)
        start = 0
        for pool, size in zip(pools, sizes):
            pool.extend((name, p, a) for p, a in problems[start : start + size])
            start += size
    for pool in pools:
        rng.shuffle(pool)  # mix tasks within each document
    return pools


def task_documents(problems: List[Tuple[str, str, str]], per_doc: int) -> List[Dict[str, str]]:
    """Pack problems, one per line, into documents of ``per_doc`` lines."""
    return [
        {
            "text": "\n".join(p + a for _, p, a in problems[i : i + per_doc]),
            "source": "tasks",
        }
        for i in range(0, len(problems), per_doc)
    ]


def exact_match(prediction: str, answer: str) -> bool:
    """Whether a model continuation of ``prompt`` answers it: the first line, spaces trimmed.

    Decoders usually drop the leading space of a continuation (SentencePiece does), so the
    comparison ignores surrounding whitespace instead of depending on it.
    """
    first_line = prediction.split("\n", 1)[0]
    return first_line.strip() == answer.strip()


# ----------------------------------------------------------------------------------------------
# Writing and fingerprinting
# ----------------------------------------------------------------------------------------------


def _write_jsonl(path: str, records: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, path)  # never leave a half-written file under the final name


def read_jsonl(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_files(out_dir: str) -> Dict[str, str]:
    """sha256 of each data file plus one combined ``content`` hash over all of them."""
    per_file = {name: sha256_file(os.path.join(out_dir, name)) for name in DATA_FILES}
    combined = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in per_file.items()).encode())
    return {"content": combined.hexdigest(), **per_file}


def corpus_params(
    seed: int = 1234,
    max_text_chars: int = 2_000_000,
    max_doc_chars: int = 16_000,
    valid_fraction: float = 0.05,
    train_problems_per_task: int = 8_000,
    valid_problems_per_task: int = 300,
    heldout_problems_per_task: int = 200,
    problems_per_doc: int = 32,
) -> dict:
    """Everything the corpus content depends on (also what a rebuild is keyed on)."""
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "seed": seed,
        "max_text_chars": max_text_chars,
        "max_doc_chars": max_doc_chars,
        "valid_fraction": valid_fraction,
        "train_problems_per_task": train_problems_per_task,
        "valid_problems_per_task": valid_problems_per_task,
        "heldout_problems_per_task": heldout_problems_per_task,
        "problems_per_doc": problems_per_doc,
        "tasks": sorted(DEFAULT_TASKS),
        # The text comes from the installed stdlib, so another Python gives another corpus.
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }


def load_manifest(out_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(out_dir, MANIFEST_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def corpus_is_current(out_dir: str, params: dict) -> bool:
    """True when ``out_dir`` holds a corpus built with ``params`` whose files are intact."""
    manifest = load_manifest(out_dir)
    if not manifest or manifest.get("params") != params:
        return False
    if not all(os.path.isfile(os.path.join(out_dir, n)) for n in DATA_FILES):
        return False
    return fingerprint_files(out_dir) == manifest.get("sha256")


def build_corpus(out_dir: str, seed: int = 1234, **kwargs) -> dict:
    """Build the corpus files in ``out_dir`` and return the manifest (deterministic in seed).

    ``kwargs`` are the size knobs of :func:`corpus_params`.
    """
    params = corpus_params(seed=seed, **kwargs)
    os.makedirs(out_dir, exist_ok=True)
    # Independent streams, so e.g. changing the text cap does not reshuffle the task problems.
    text_rng = random.Random(f"{seed}:text")
    task_rng = random.Random(f"{seed}:tasks")

    text_docs = collect_stdlib_documents(text_rng, params["max_text_chars"], params["max_doc_chars"])
    n_valid_text = max(1, round(len(text_docs) * params["valid_fraction"]))
    # Files were visited in random order, so the first ones are a random document-level sample.
    valid_text, train_text = text_docs[:n_valid_text], text_docs[n_valid_text:]

    train_tasks, valid_tasks, heldout_tasks = split_task_pools(
        DEFAULT_TASKS,
        (
            params["train_problems_per_task"],
            params["valid_problems_per_task"],
            params["heldout_problems_per_task"],
        ),
        task_rng,
    )
    per_doc = params["problems_per_doc"]
    train_docs = train_text + task_documents(train_tasks, per_doc)
    valid_docs = valid_text + task_documents(valid_tasks, per_doc)
    # Interleave text and tasks so any contiguous slice of a split has both kinds.
    task_rng.shuffle(train_docs)
    task_rng.shuffle(valid_docs)

    _write_jsonl(os.path.join(out_dir, TRAIN_FILE), train_docs)
    _write_jsonl(os.path.join(out_dir, VALID_FILE), valid_docs)
    _write_jsonl(
        os.path.join(out_dir, HELDOUT_FILE),
        [{"task": t, "prompt": p, "answer": a} for t, p, a in heldout_tasks],
    )

    manifest = {
        "params": params,
        "seed": seed,
        "sizes": {
            "train_documents": len(train_docs),
            "valid_documents": len(valid_docs),
            "train_text_documents": len(train_text),
            "valid_text_documents": len(valid_text),
            "train_text_chars": sum(len(d["text"]) for d in train_text),
            "valid_text_chars": sum(len(d["text"]) for d in valid_text),
            "train_problems": len(train_tasks),
            "valid_problems": len(valid_tasks),
            "heldout_problems": len(heldout_tasks),
            "bytes": {n: os.path.getsize(os.path.join(out_dir, n)) for n in DATA_FILES},
        },
        "sha256": fingerprint_files(out_dir),
    }
    # The manifest is written last: its presence marks a complete corpus.
    with open(os.path.join(out_dir, MANIFEST_FILE), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest
