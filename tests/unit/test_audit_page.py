"""The audit page's tables: alignment by type, decimals that keep small values visible, and empty cells
that say why."""

from __future__ import annotations

from html.parser import HTMLParser

import polars as pl

from rlme_pipeline.audit.page import _no_auroc, table


class _Cells(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cells, self._cls = [], None

    def handle_starttag(self, tag, attrs):
        if tag in ("td", "th"):
            self._cls, self._text = dict(attrs).get("class", ""), ""

    def handle_data(self, data):
        if self._cls is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.cells.append((self._cls, self._text))
            self._cls = None


def _cells(html: str) -> list[tuple[str, str]]:
    p = _Cells()
    p.feed(html)
    return p.cells


def test_text_left_numbers_right_with_decimals_that_keep_small_values():
    df = pl.DataFrame({"scoreset": ["train", "v2"], "n": [32, 32], "reward_mean": [-15.541234, -0.0058981]})
    cells = _cells(table(df))
    assert cells[:3] == [("text", "scoreset"), ("num", "n"), ("num", "reward_mean")]
    assert cells[3:] == [("text", "train"), ("num", "32"), ("num", "-15.54123"),
                         ("text", "v2"), ("num", "32"), ("num", "-0.00590")]  # fmt: skip


def test_empty_auroc_says_why_and_headers_can_be_renamed():
    df = pl.DataFrame({"n": [4, 4, 4], "n_correct": [0, 4, 2], "auroc": [None, None, 0.75]})
    cells = _cells(table(df, labels={"auroc": "AUROC"}, missing=_no_auroc))
    assert cells[2] == ("num", "AUROC")
    values = [text for cls, text in cells[3:]]
    assert values[2] == "– (no correct rollouts)" and values[5] == "– (all correct)" and values[8] == "0.7500"
    long = pl.DataFrame({"completion": ["x" * 1000]})
    (_, head), (cls, text) = _cells(table(long))
    assert cls == "text long" and len(text) == 300 and text.endswith("…")
