"""Real text that ships offline with Python, for filler and continuation tasks.

Nothing here is written for the benchmark: the Python Language Reference as CPython ships it
(`pydoc_data.topics`), CPython's own stdlib source and LICENSE, and, when present, the license texts
of the operating system (/usr/share/common-licenses). Sources that ship with CPython come first, so
two machines with the same Python version build the same tasks.
"""
from __future__ import annotations

import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Stdlib modules whose source is long, mostly prose-like code with docstrings, and stable across 3.10+.
STDLIB_SOURCES = ("argparse.py", "textwrap.py", "difflib.py", "inspect.py", "pathlib.py", "typing.py")
SYSTEM_LICENSES = Path("/usr/share/common-licenses")
SYSTEM_LICENSE_NAMES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1")


@dataclass(frozen=True)
class Document:
    """One contiguous real text. `name` says where it came from (for the report)."""

    name: str
    kind: str  # "docs" | "code" | "license"
    text: str


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=1)
def python_docs() -> Document:
    """The Python Language Reference topics that `help()` shows, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return Document(f"pydoc_data.topics (Python {sys.version.split()[0]})", "docs", text)


@lru_cache(maxsize=None)
def stdlib_source(name: str) -> Document:
    path = _stdlib_dir() / name
    return Document(f"stdlib/{name}", "code", path.read_text(encoding="utf-8"))


@lru_cache(maxsize=1)
def license_documents() -> tuple[Document, ...]:
    """CPython's LICENSE.txt, then the system's license texts that exist on this machine."""
    docs = []
    py_license = _stdlib_dir() / "LICENSE.txt"
    if py_license.is_file():
        docs.append(Document("stdlib/LICENSE.txt", "license", py_license.read_text(encoding="utf-8")))
    for name in SYSTEM_LICENSE_NAMES:
        p = SYSTEM_LICENSES / name
        if p.is_file():
            docs.append(Document(f"common-licenses/{name}", "license", p.read_text(encoding="utf-8")))
    return tuple(docs)


def continuation_documents() -> list[Document]:
    """Long contiguous texts for teacher-forced continuation, cycling docs, code and licenses."""
    docs = [python_docs()]
    for name in STDLIB_SOURCES:
        try:
            docs.append(stdlib_source(name))
        except OSError:
            continue
    docs.extend(license_documents())
    return docs


_BLANK = re.compile(r"\n\s*\n")
_RULE = set("*=-~^#")


def paragraphs(text: str, min_chars: int = 40) -> list[str]:
    """Split on blank lines; drop tiny fragments (headings underlines, lone symbols)."""
    out = []
    for p in _BLANK.split(text):
        p = p.strip("\n")
        if len(p.strip()) >= min_chars:
            out.append(p)
    return out


@lru_cache(maxsize=1)
def filler_paragraphs() -> tuple[str, ...]:
    """Prose paragraphs for haystacks: the Python Language Reference, grammar blocks excluded."""
    out = []
    for p in paragraphs(python_docs().text):
        # drop rst heading rules, skip indented code/grammar blocks, join wrapped lines (ascii tables stay)
        lines = [ln for ln in p.splitlines() if ln.strip() and not set(ln.strip()) <= _RULE]
        if not lines or all(ln.startswith("   ") for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        if len(text) >= 40:
            out.append(text)
    return tuple(out)


@lru_cache(maxsize=1)
def license_paragraphs() -> tuple[str, ...]:
    """A second filler source: the license texts (CPython's LICENSE.txt ships everywhere), wrapped lines
    joined, so a needle is found in legal prose as well as in technical prose."""
    out = []
    for doc in license_documents():
        for p in paragraphs(doc.text):
            text = " ".join(ln.strip() for ln in p.splitlines() if ln.strip())
            if len(text) >= 40:
                out.append(text)
    return tuple(out)
