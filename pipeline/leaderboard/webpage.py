"""Self-contained HTML pages: style, sorting script, Content Security Policy and safe building blocks.

Pages must open from the file system with no server and no internet, so each carries its own
small style sheet and sorting script (no CDN). Every piece of user text goes through :func:`esc`;
the script is a constant and never holds data, and the policy allows only that script (by hash),
so injected markup could not run even if escaping were missed.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import os
from pathlib import Path
from urllib.parse import quote

import pandas as pd

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d232b;background:#fbfbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 4px}h3{font-size:15px;margin:20px 0 6px}
.muted{color:#5c6773}.small{font-size:12px}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
section.protocol{border-top:1px solid #d8dde3;margin-top:18px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;margin:8px 0}dl.facts dt{color:#5c6773}
dl.facts dd{margin:0}p.inline{display:flex;flex-wrap:wrap;gap:4px 22px}p.inline b{font-weight:400;color:#5c6773}
.pair{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}.pair>.tbl{flex:1 1 0}.pair>.fig{flex:0 0 auto}
table{border-collapse:collapse;background:#fff;box-shadow:0 0 0 1px #d8dde3}
th,td{padding:4px 6px;border-bottom:1px solid #e6e9ed;text-align:right;white-space:nowrap}
th{background:#eef1f4;font-weight:600;white-space:normal;vertical-align:bottom;max-width:80px;min-width:3.5em}
td.t,th.t{text-align:left}
table.sortable th{cursor:pointer;user-select:none}table.sortable th:hover{background:#e2e7ec}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
tr.baseline td{background:#fff8e6}
.badge{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;line-height:18px}
.b-top{background:#dcefe0;color:#1e5b2c}.b-diff{background:#fbe1dc;color:#8a2a17}.b-same{background:#e8ebef;color:#46505c}
.b-na{color:#7a848f}.b-base{background:#fde9b6;color:#6b4b00}
.ci{color:#5c6773;font-size:12px}
svg.forest{background:#fff;box-shadow:0 0 0 1px #d8dde3}
img.report{max-width:100%;border:1px solid #d8dde3;background:#fff}
pre{background:#fff;border:1px solid #d8dde3;padding:8px;overflow:auto;max-height:420px}
a{color:#0b5cad}
svg .ph{font:600 12px sans-serif;text-anchor:middle}svg .ph.l{text-anchor:start}
svg .tick{font:10px sans-serif;fill:#5c6773;text-anchor:middle}svg .tick.s{text-anchor:start}svg .tick.e{text-anchor:end}
svg .key{font:11px sans-serif;fill:#5c6773}svg .key .entry{fill:#1f5fa8}svg .key .baseline{fill:#c27c00}svg .lab{font:12px sans-serif}
svg .lab.baseline{fill:#8a5a00}svg .grid{stroke:#eceff2}svg .frame{stroke:#b9c1ca}svg .ci{stroke-width:2.2}
svg .baseref{stroke:#c27c00;stroke-dasharray:3 3}svg .pv{font:11px sans-serif}svg .pv.diff{fill:#8a2a17;font-weight:600}
svg .pv.same{fill:#5c6773}svg .pv.top{fill:#1e5b2c;font-weight:600}svg .pv.na{fill:#9aa3ad}
"""

SORT_JS = """
(function () {
  function key(cell) {
    var v = cell.getAttribute("data-sort");
    if (v === null) { v = cell.textContent.trim(); }
    if (v === "") { return null; }
    var n = Number(v);
    return isFinite(n) ? n : v.toLowerCase();
  }
  function compare(x, y, sign) {
    if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
    if (typeof x !== typeof y) { return typeof x === "number" ? -1 : 1; }
    return sign * (x < y ? -1 : x > y ? 1 : 0);
  }
  function sortBy(table, th, col) {
    var sign = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) { heads[i].removeAttribute("aria-sort"); }
    th.setAttribute("aria-sort", sign > 0 ? "ascending" : "descending");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { return compare(key(a.cells[col]), key(b.cells[col]), sign); });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(table, th, col); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, th, col); }
      });
    });
  });
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (f"default-src 'none'; script-src {_csp_hash(SORT_JS)}; style-src {_csp_hash(CSS)}; img-src 'self'; "
       "base-uri 'none'; form-action 'none'")
"""Only this module's own script and style run; images from the site folder. No user text here."""


def esc(value) -> str:
    """User text as HTML text or attribute value (quotes escaped too)."""
    return html.escape("" if missing(value) else str(value), quote=True)


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def num(value, spec: str = ".3f") -> str:
    return "" if missing(value) else format(float(value), spec)


def sort_key(value) -> str:
    return "" if missing(value) else repr(float(value))


def short(text, n: int = 12) -> str:
    """A fingerprint cut to ``n`` characters, the whole one in the tooltip."""
    text = "" if missing(text) else str(text)
    return f'<span class="mono" title="{esc(text)}">{esc(text[:n])}</span>'


def href(target: Path, page_dir: Path) -> str:
    """A relative, URL-quoted, escaped link from a page in ``page_dir`` to ``target``."""
    try:
        rel = os.path.relpath(Path(target).resolve(), Path(page_dir).resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return esc(Path(target).resolve().as_uri())
    return esc(quote(rel.replace(os.sep, "/")))


def html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{esc(title)}</title>\n<style>{CSS}</style></head>\n<body>\n{body}\n"
            f"<script>{SORT_JS}</script>\n</body></html>\n")


def html_table(headers: list[tuple[str, str]], rows: list[str]) -> str:
    """A sortable table, its rows given in the order of the first column; ``headers`` are (label, css
    class), ``rows`` ready ``<tr>`` markup."""
    heads = "".join(f'<th class="{c}"{" aria-sort=ascending" if i == 0 else ""}>{esc(label)}</th>'
                    for i, (label, c) in enumerate(headers))
    return '<table class="sortable"><thead><tr>' + heads + "</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"


def td(text: str, sort=None, cls: str = "") -> str:
    """A cell; ``text`` is markup already escaped, ``sort`` the raw value the script sorts by."""
    attrs = f' class="{cls}"' if cls else ""
    if sort is not None:
        attrs += f' data-sort="{esc(sort)}"'
    return f"<td{attrs}>{text}</td>"


def facts(pairs: list[tuple[str, str]]) -> str:
    """A definition list; values are markup already escaped."""
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"
