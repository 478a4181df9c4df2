"""The documentation's references resolve.

- Every relative Markdown link ``[text](path)`` / ``[text](path#anchor)`` in the
  repository's Markdown files points to an existing file, and an anchor into a Markdown
  file names one of its headings (GitHub's heading ids). Web links are not followed.
- Every mention of a page under docs/ (in Markdown, and in the Python files of lark_jax/,
  benchmarks/, examples/ and tests/) names a page that exists, and a section it cites
  (the page followed by ``, step N`` or ``, "Title"``) is one of that page's headings.
- The docs index links every page of docs/.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
PY_DIRS = ("lark_jax", "benchmarks", "examples", "tests")
SKIP_DIRS = {"node_modules", "__pycache__", "build", "dist", "site-packages"}

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[`~]*[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)[ \t]*#*[ \t]*$", re.M)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
# A docs page named by its repository path, optionally followed by a cited section.
_MENTION = re.compile(r"(?<![\w./-])docs/([\w-]+(?:/[\w-]+)*\.md)"
                      r"(?:,\s*(?:steps?\s+(\d+)|\"([^\"\n]+)\"))?", re.I)


def _blank(m: re.Match) -> str:
    """The match replaced by spaces, newlines kept (line numbers stay right)."""
    return re.sub(r"[^\n]", " ", m.group(0))


def strip_code(text: str) -> str:
    """Markdown text with fenced code blocks and code spans blanked out."""
    return _CODE_SPAN.sub(_blank, _FENCE.sub(_blank, text))


def slug(heading: str) -> str:
    """GitHub's id for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    s = re.sub(r"<[^>]+>", "", s).strip().lower()
    return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def headings(text: str) -> list[str]:
    """The ATX headings of a Markdown text, outside code blocks."""
    return [m.group(1) for m in _HEADING.finditer(_FENCE.sub(_blank, text))]


def anchors(text: str) -> set[str]:
    """The ids GitHub gives the headings of ``text`` (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for h in headings(text):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def broken_links(path: Path, text: str) -> list[str]:
    """``"path:line: target (why)"`` for every relative link of a Markdown text that does
    not resolve."""
    out = []
    for m in _LINK.finditer(strip_code(text)):
        target = m.group(1)
        if not target or _SCHEME.match(target):
            continue  # empty, or a web / mail link
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / unquote(file_part)).resolve() if file_part else path
        where = f"{path}:{_line(text, m.start())}: {target}"
        if not dest.exists():
            out.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and dest.is_file():
            if unquote(anchor).lower() not in anchors(dest.read_text(encoding="utf-8")):
                out.append(f"{where} (no heading with id #{anchor} in {dest.name})")
    return out


def broken_mentions(path: Path, text: str, root: Path) -> list[str]:
    """``"path:line: docs/page (why)"`` for every mention of a docs page that does not exist,
    or whose cited section (``, step N`` / ``, "Title"``) is not among its headings."""
    out = []
    for m in _MENTION.finditer(text):
        page, step, title = m.groups()
        dest = root / "docs" / page
        where = f"{path}:{_line(text, m.start())}: docs/{page}"
        if not dest.is_file():
            out.append(f"{where} (no such page)")
            continue
        if step is None and title is None:
            continue
        heads = [h.lower() for h in headings(dest.read_text(encoding="utf-8"))]
        if step is not None and not any(re.search(rf"\bsteps?\s+{step}\b", h) for h in heads):
            out.append(f"{where}, step {step} (no heading 'Step {step}')")
        if title is not None and not any(title.lower() in h for h in heads):
            out.append(f"{where}, \"{title}\" (no heading with that title)")
    return out


def _walk(root: Path, suffix: str, under=None):
    tops = [root / d for d in under] if under else [root]
    for top in tops:
        for dirpath, dirnames, filenames in os.walk(top):
            # No hidden directories (.git, .venv, ...), build output or virtual environments.
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info")
                and not (Path(dirpath, d) / "pyvenv.cfg").exists())
            for f in sorted(filenames):
                if f.endswith(suffix):
                    yield Path(dirpath, f)


def markdown_files(root: Path = ROOT) -> list[Path]:
    return list(_walk(root, ".md"))


def python_files(root: Path = ROOT) -> list[Path]:
    return list(_walk(root, ".py", [d for d in PY_DIRS if (root / d).is_dir()]))


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


# -- the repository ----------------------------------------------------------------------


def test_relative_markdown_links_resolve():
    files = markdown_files()
    assert ROOT / "README.md" in files and ROOT / "docs" / "method.md" in files
    bad = [b for p in files for b in broken_links(p, _read(p))]
    assert not bad, "\n".join(bad)


def test_docs_pages_and_sections_mentioned_exist():
    files = markdown_files() + python_files()
    mentioned = [p for p in files if "docs/" in _read(p)]
    assert ROOT / "lark_jax" / "selection" / "closed_form.py" in mentioned
    bad = [b for p in files for b in broken_mentions(p, _read(p), ROOT)]
    assert not bad, "\n".join(bad)


def test_docs_index_links_every_page():
    index = ROOT / "docs" / "README.md"
    linked = {(index.parent / m.group(1).partition("#")[0]).resolve()
              for m in _LINK.finditer(strip_code(_read(index)))}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md") if p != index}
    assert pages and pages <= linked, sorted(str(p) for p in pages - linked)


# -- the checker can fail ----------------------------------------------------------------


def test_checker_reports_missing_files_and_anchors(tmp_path):
    (tmp_path / "there.md").write_text("# Title\n\n## Step 3: select\n\n## Step 3: select\n")
    page = tmp_path / "page.md"
    text = ("[ok](there.md) [ok](there.md#step-3-select-1) [web](https://example.com/none)\n"
            "[gone](made_up_page.md)\n"
            "[bad anchor](there.md#no-such-heading)\n"
            "`[in code](ignored.md)`\n"
            "```\n[in a block](ignored_too.md)\n```\n")
    page.write_text(text)
    bad = broken_links(page, text)
    assert len(bad) == 2, bad
    assert bad[0].endswith("made_up_page.md (no such file)") and ":2:" in bad[0]
    assert "no-such-heading" in bad[1] and ":3:" in bad[1]


def test_checker_reports_missing_pages_and_sections(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Guide\n\n## Step 3: select\n\n## Formats\n")
    src = tmp_path / "module.py"
    page = "docs/" + "guide.md"
    text = (f'"""See {page}, step 3 and {page}, "Formats".\n\n'
            f'Also {page}, step 9, {page}, "Nowhere" and {"docs/" + "missing_page.md"}."""\n')
    bad = broken_mentions(src, text, tmp_path)
    assert len(bad) == 3, bad
    assert "step 9" in bad[0] and '"Nowhere"' in bad[1]
    assert bad[2].endswith("missing_page.md (no such page)")
    assert all(":3:" in b for b in bad)


def test_slugs_follow_github():
    assert slug("Step 3: the χ² selection policy") == "step-3-the-χ²-selection-policy"
    assert slug("Selection (JSONL) and its manifest") == "selection-jsonl-and-its-manifest"
    assert slug("`score` (`lark_jax.learnability.runner.score_pool`)") == \
        "score-lark_jaxlearnabilityrunnerscore_pool"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_every_flag_in_the_docs_commands_exists():
    """Each ``lark-jax COMMAND --flag`` written in README.md or docs/ names a command and
    flags that the CLI has (placeholders such as B or ... are values, not checked)."""
    import shlex

    from lark_jax.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.choices and "score" in a.choices)
    bad = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8").replace("\\\n", " ")
        for m in re.finditer(r"^\s*(?:\$ )?lark-jax (\S+)(.*)$", text, re.M):
            command, rest = m.group(1), m.group(2).split("`")[0]
            if command not in sub.choices:
                bad.append(f"{path.name}: unknown command {command!r}")
                continue
            flags = sub.choices[command]._option_string_actions
            for word in shlex.split(rest, comments=True):
                name = word.split("=")[0]
                if name.startswith("--") and name not in flags:
                    bad.append(f"{path.name}: {command} has no flag {name}")
    assert bad == []
