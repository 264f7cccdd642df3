"""ChatGPT's rendered HTML (as ShareGPT exported it) to the Markdown the model wrote, with markdownify.

ShareGPT saved the answer as ChatGPT's page showed it: `<p>`, `<ol><li>`, `<table>`, `<strong>`, entities, code
blocks as `<pre>` holding a header (the language name and a "Copy code" button with its icon) around
`<code class="hljs language-python">`, KaTeX maths as MathML plus its TeX source, and a "1 / 2" counter of
regenerated answers glued to the front of the value. `to_markdown` turns that back into Markdown:

- code blocks become fenced blocks with their language (from `language-*`), the header and button gone;
- KaTeX becomes its TeX source between `$` (inline) or `$$` (display);
- `*` and `_` are not escaped: the model wrote `snake_case`, not `snake\\_case`, and the student should too;
- a value that is not HTML (a user's typed text) passes through unchanged, whatever `<`, `*` or `&` it holds;
  only a ChatGPT code block left as HTML inside Markdown (`<pre><div ...>...</pre>`) is converted in place.

Which values are HTML is decided by `looks_like_html`: the text (after the counter) opens with one of the
block tags ChatGPT's renderer emits and ends with a closing tag. A user asking "how do I center a <div>?"
therefore stays plain text.
"""

from __future__ import annotations

import re

from markdownify import ATX, MarkdownConverter

# The tags ChatGPT's renderer wraps an answer in; a value opening with one and ending in a closing tag is HTML.
_BLOCK_TAGS = "div|p|pre|ol|ul|table|blockquote|h[1-6]|hr|br"
_OPENS_WITH_BLOCK = re.compile(rf"^<(?:{_BLOCK_TAGS})\b[^<>]*/?>", re.IGNORECASE)
_ENDS_WITH_CLOSE = re.compile(r"</[a-zA-Z][a-zA-Z0-9]*\s*>$")
# "1 / 1", "2 / 3": the regenerate counter of the ChatGPT page, glued to the start of the value (no space
# after it: a typed "3 / 4 of a cup" keeps its fraction).
_COUNTER = re.compile(r"^\s*\d+\s*/\s*\d+(?=\S)")
# The "Copy1,234 chars / 210 words" badge a popular browser extension added to exported answers.
_COPY_BADGE = re.compile(r"Copy[\d,]+ chars / [\d,]+ words")
_BLANK_RUNS = re.compile(r"\n{3,}")
# A ChatGPT code block (a <pre> wrapping the page's <div> furniture) inside text that is otherwise Markdown, as
# some export tools leave it: only that block is converted, so the Markdown around it keeps its line breaks.
_EMBEDDED_CODE_BLOCK = re.compile(r"<pre\b[^<>]*>\s*<div\b.*?</pre>", re.IGNORECASE | re.DOTALL)


def strip_counter(text: str) -> str:
    """Drop the "N / M" regenerate counter glued to the front of an exported value."""
    return _COUNTER.sub("", text, count=1)


def looks_like_html(text: str) -> bool:
    stripped = text.strip()
    return bool(_OPENS_WITH_BLOCK.match(stripped) and _ENDS_WITH_CLOSE.search(stripped))


def _code_language(pre) -> str:
    code = pre.find("code")
    for cls in (code.get("class") or []) if code is not None else []:
        if cls.startswith("language-"):
            return cls.removeprefix("language-")
    return ""


def _katex_to_tex(katex) -> None:
    """KaTeX (MathML plus HTML) back to its TeX source: `$...$` inline, `$$...$$` for a display block."""
    tex = katex.find("annotation", attrs={"encoding": "application/x-tex"})
    if tex is None:
        return
    display = katex.parent is not None and "katex-display" in (katex.parent.get("class") or [])
    fence = "$$" if display else "$"
    (katex.parent if display else katex).replace_with(f"{fence}{tex.get_text().strip()}{fence}")


class ChatGPTConverter(MarkdownConverter):
    """markdownify with the page furniture of ChatGPT's answers removed before conversion."""

    def __init__(self, **options):
        defaults = {
            "escape_asterisks": False,
            "escape_underscores": False,
            "heading_style": ATX,
            "bullets": "-",
            "code_language_callback": _code_language,
        }
        super().__init__(**{**defaults, **options})

    def convert_soup(self, soup):
        # One pass over the tags that matter (three find_all passes cost half the conversion time).
        for tag in soup.find_all(["button", "svg", "script", "style", "pre", "span"]):
            if tag.name == "pre":
                code = tag.find("code")
                if code is not None:  # keep the code alone: the header (language label) goes with the rest
                    code = code.extract()
                    tag.clear()
                    tag.append(code)
            elif tag.name != "span":
                tag.decompose()
            elif "katex" in (tag.get("class") or []):
                _katex_to_tex(tag)
        return super().convert_soup(soup)


_converter = ChatGPTConverter()


def to_markdown(value: str) -> tuple[str, bool]:
    """The Markdown text of one exported value, and whether it was HTML. Plain text is returned unchanged
    (only the glued regenerate counter is removed)."""
    text = strip_counter(value)
    if not looks_like_html(text):
        blocks = _EMBEDDED_CODE_BLOCK.subn(lambda m: f"\n\n{_converter.convert(m.group(0)).strip()}\n\n", text)
        return (_BLANK_RUNS.sub("\n\n", blocks[0]).strip(), True) if blocks[1] else (text, False)
    markdown = _converter.convert(text)
    markdown = _COPY_BADGE.sub("", markdown)
    return _BLANK_RUNS.sub("\n\n", markdown).strip(), True
