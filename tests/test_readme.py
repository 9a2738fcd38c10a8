"""The README's claims about the code: the lines its reading table gives hold what it names."""

import os
import re

from tools import ROOT


def test_the_pllava_table_names_functions_and_classes_inside_the_lines_it_gives():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text.split("## How PLLaVA works", 1)[1].split("\n## ", 1)[0]
    checked = 0
    for row in table.splitlines():
        for file, spans, names in re.findall(
            r"`(\w+\.py)` ((?:\d+-\d+(?:, )?)+)(?: \(([^)]*)\))?", row
        ):
            lines = open(os.path.join(ROOT, file), encoding="utf-8").read().splitlines()
            ranges = [tuple(map(int, s.split("-"))) for s in spans.strip(", ").split(", ")]
            inside = [lines[a - 1:b] for a, b in ranges]
            assert all(b <= len(lines) for _, b in ranges), (file, spans)
            for name in re.findall(r"`(\w+)`", names or ""):
                assert any(re.match(rf"\s*(def|class) {name}\b",
                                    line) for part in inside for line in part), (file, spans, name)
                checked += 1
            first = [part[0] for part in inside]
            assert all(re.match(r"\s*(def|class|@)", line) for line in first), (file, spans, first)
    assert checked >= 5
