"""Offline, seeded data for the applications: text that ships with CPython, bytes as tokens.

- Labelled docstrings (`docstrings`): the docstrings of standard-library modules and their
  members, labelled by the module family they come from (files, text, numbers, ...). The labels
  are skewed across sites by a Dirichlet split (`dirichlet_split`), as in the paper.
- Text sources (`text_sources`): three kinds of text, one per site for full fine-tuning: the
  language reference (`pydoc_data.topics`), API docstrings, and Python source code.
- Pre-training text (`pretraining_text`): docstrings of modules no task uses, so the base model
  knows bytes of English and Python but none of the tasks' own texts.

Everything is read from the running interpreter's standard library, so figures are reproducible
for one Python version (docstrings change between releases). Tokens are bytes (ids 0..255) plus a
pad id: no tokenizer to train, nothing to download.
"""

from __future__ import annotations

import importlib
import inspect
import random
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

PAD_ID = 256
VOCAB_SIZE = 257

# Module families: a docstring's label is the family of the module it was found in.
FAMILIES: dict[str, tuple[str, ...]] = {
    "files": ("os", "os.path", "shutil", "pathlib", "glob", "tempfile", "io", "zipfile", "tarfile"),
    "text": ("string", "re", "textwrap", "difflib", "unicodedata", "codecs", "html", "locale"),
    "numbers": ("math", "cmath", "decimal", "fractions", "statistics", "random", "numbers"),
    "network": ("socket", "ssl", "http.client", "urllib.request", "urllib.parse", "smtplib"),
    "concurrency": ("threading", "multiprocessing", "asyncio", "queue", "subprocess", "sched"),
    "containers": ("collections", "heapq", "bisect", "array", "itertools", "functools", "json"),
}
_PRETRAINING_MODULES = (
    "typing", "inspect", "logging", "argparse", "unittest", "dataclasses", "enum", "contextlib",
    "datetime", "calendar", "email.message", "pprint", "traceback", "warnings", "xml.dom.minidom",
)  # fmt: skip
_SOURCE_MODULES = ("collections", "textwrap", "argparse", "dataclasses", "fractions", "shlex")


def encode(text: str, length: int) -> list[int]:
    """`text`'s first `length` UTF-8 bytes as token ids, padded with PAD_ID."""
    ids = list(text.encode("utf-8")[:length])
    return ids + [PAD_ID] * (length - len(ids))


def _clean(doc: str) -> str:
    return " ".join(doc.split())


def _own(member: object, module_name: str) -> bool:
    """Defined by this module or by its C accelerator (`_socket` for socket, posix for os):
    re-exports belong to the module that defines them."""
    owner = getattr(member, "__module__", None) or module_name
    return owner == module_name or owner.startswith("_") or owner == "posix"


def _docs_of(owner: object, module_name: str, depth: int = 0) -> list[str]:
    docs = [inspect.getdoc(owner) or ""]
    for name, member in sorted(vars(owner).items()):
        if name.startswith("_") or not _own(member, module_name):
            continue
        if inspect.isclass(member) and depth == 0:
            docs += _docs_of(member, module_name, depth + 1)  # its methods too
        elif inspect.isroutine(member):
            docs.append(inspect.getdoc(member) or "")
    return docs


def _docs_of_module(name: str) -> list[str]:
    module = importlib.import_module(name)
    with warnings.catch_warnings():  # reading typing.io's docstring warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        docs = _docs_of(module, module.__name__)
    return [_clean(doc) for doc in docs if len(doc) >= 40]


@cache
def docstrings() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(texts, labels): every distinct standard-library docstring of FAMILIES, label = family."""
    seen: set[str] = set()
    texts: list[str] = []
    labels: list[int] = []
    for label, modules in enumerate(FAMILIES.values()):
        for module in modules:
            for doc in _docs_of_module(module):
                if doc not in seen:
                    seen.add(doc)
                    texts.append(doc)
                    labels.append(label)
    return tuple(texts), tuple(labels)


@cache
def pretraining_text() -> str:
    """Docstrings of modules no task reads: the shared text the base model is pre-trained on."""
    return "\n".join(doc for name in _PRETRAINING_MODULES for doc in _docs_of_module(name))


@cache
def text_sources() -> dict[str, str]:
    """Three different kinds of text, one per site of the full fine-tuning task."""
    from pydoc_data.topics import topics

    reference = "\n".join(_clean(topics[key]) for key in sorted(topics))
    api = "\n".join(docstrings()[0])
    code = "\n".join(_module_source(name) for name in _SOURCE_MODULES)
    return {"language-reference": reference, "api-docstrings": api, "source-code": code}


def _module_source(name: str) -> str:
    origin = importlib.util.find_spec(name).origin  # type: ignore[union-attr]
    return Path(str(origin)).read_text(encoding="utf-8")


def text_windows(text: str, length: int, count: int, seed: int) -> torch.Tensor:
    """`count` windows of `length` bytes at seeded random places of `text` (count x length ids)."""
    data = text.encode("utf-8")
    rng = random.Random(seed)
    starts = [rng.randrange(len(data) - length) for _ in range(count)]
    return torch.tensor([list(data[s : s + length]) for s in starts], dtype=torch.long)


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """(train, held-out): the last `held_out` share of the text is never trained on."""
    cut = int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def dirichlet_split(
    labels: list[int], sites: int, alpha: float = 0.5, seed: int = 0, min_size: int = 10
) -> list[list[int]]:
    """Indices of `labels` per site: each class's items shared out by Dirichlet(alpha) draws.

    Drawn again (same seed stream) until every site holds `min_size` items: a site with no data
    has no local model to compare with.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    while True:
        parts: list[list[int]] = [[] for _ in range(sites)]
        for label in sorted(by_class):
            members = rng.permutation(by_class[label])
            shares = rng.dirichlet([alpha] * sites)
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(int(i) for i in chunk)
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]


@dataclass(frozen=True)
class LabelledSplit:
    """Token ids and labels per site (train and test) after a Dirichlet split of the labels."""

    train: list[tuple[torch.Tensor, torch.Tensor]]
    test: list[tuple[torch.Tensor, torch.Tensor]]
    classes: int

    def pooled_train(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _concat(self.train)

    def pooled_test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _concat(self.test)


def _concat(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def labelled_split(
    sites: int, length: int, per_class: int, test_share: float = 0.25, seed: int = 0
) -> LabelledSplit:
    """Docstrings (at most `per_class` of each family), Dirichlet(0.5)-split over `sites`; each
    site's test items follow its own label skew, and the union of the tests is the pooled one."""
    texts, labels = docstrings()
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in range(len(FAMILIES)):
        members = [i for i, lab in enumerate(labels) if lab == label]
        chosen += sorted(rng.sample(members, min(per_class, len(members))))
    ids = torch.tensor([encode(texts[i], length) for i in chosen], dtype=torch.long)
    targets = torch.tensor([labels[i] for i in chosen], dtype=torch.long)
    train, test = [], []
    for part in dirichlet_split(targets.tolist(), sites, seed=seed):
        order = torch.tensor(random.Random(seed + len(part)).sample(part, len(part)))
        cut = max(1, int(len(order) * test_share))
        test.append((ids[order[:cut]], targets[order[:cut]]))
        train.append((ids[order[cut:]], targets[order[cut:]]))
    return LabelledSplit(train, test, len(FAMILIES))
