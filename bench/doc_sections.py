"""How a benchmark script writes its figures into a Markdown document (docs/benchmarks.md): its
own `## ` section is replaced, or appended when absent; every other section stays as it is."""

from __future__ import annotations

from pathlib import Path


def write_section(text: str, out: Path) -> None:
    """`text` starts with its `## Title` line; the section of that title in `out` (up to the
    next `## `) becomes `text`. A missing `out` starts as "# Benchmarks"."""
    title = text.split("\n", 1)[0]
    doc = out.read_text() if out.exists() else "# Benchmarks\n"
    if title in doc:
        head, rest = doc.split(title, 1)
        tail = rest.split("\n## ", 1)
        doc = head + text + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    out.write_text(doc)
