"""The course site (``make site``): built from the committed notebooks, then opened page by page in headless
Chromium (docs/site/site_browser.py). Also: the browser check itself catches what it claims to catch.

Chromium comes from Debian (``apt-get install chromium``; .ci/run installs it). Without it these tests skip, unless
MINILCM_REQUIRE_BROWSER=1 (set by .ci/run), where a missing browser fails them."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "site"))
import site_browser as browser  # noqa: E402  (docs/site is not a package: the site scripts sit beside its conf.py)
import build_site as site_build  # noqa: E402

BUDGET_S = 120  # the budgets: build <= 2 minutes, browser test <= 2 minutes, on the 2-core machine


def _need_browser():
    if browser.chromium_path() is None:
        if os.environ.get("MINILCM_REQUIRE_BROWSER") == "1":
            pytest.fail("MINILCM_REQUIRE_BROWSER=1 but no Chromium: apt-get install chromium")
        pytest.skip("no Chromium (apt-get install chromium)")
    pytest.importorskip("playwright")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("myst_nb")
    tmp = tmp_path_factory.mktemp("site")
    t0 = time.perf_counter()
    out = site_build.build(tmp / "site", tmp / "src")
    seconds = time.perf_counter() - t0
    return out, seconds


def test_site_notebook_collapses_solutions_and_drops_widgets():
    nb = json.loads((ROOT / "notebooks" / "01_ddpm.ipynb").read_text())
    shown = site_build.site_notebook(nb, "01_ddpm")
    solutions = [c for c in shown["cells"] if c["cell_type"] == "code" and site_build.SOLUTION in "".join(c["source"])]
    assert len(solutions) == 5 and all("hide-input" in c["metadata"]["tags"] for c in solutions)
    answers = [c for c in shown["cells"] if "answer" in c["metadata"].get("tags", [])]
    assert len(answers) >= 2 and all(c["source"].startswith("::::{dropdown} Answer") for c in answers)
    outputs = [o for c in shown["cells"] for o in c.get("outputs", [])]
    assert not any(site_build.WIDGET in o.get("data", {}) for o in outputs) and "widgets" not in shown["metadata"]
    assert "../student/01_ddpm.ipynb" in "".join(shown["cells"][1]["source"])
    # the committed notebook is untouched
    assert any(site_build.WIDGET in o.get("data", {}) for c in nb["cells"] for o in c.get("outputs", []))


@pytest.mark.slow
def test_site_builds_within_budget_with_every_page(site):
    out, seconds = site
    assert seconds <= BUDGET_S, f"site build took {seconds:.0f} s (budget {BUDGET_S} s)"
    chapters = site_build.chapters()
    assert len(chapters) == 8
    for nb in chapters:
        html = (out / "notebooks" / f"{nb.stem}.html").read_text()
        assert re.search(r'href="[^"]*_downloads/[^"]*/' + nb.stem + r'\.ipynb"', html), nb.stem
        text = json.loads(nb.read_text())
        n_solutions = sum(site_build.SOLUTION in "".join(c["source"]) for c in text["cells"] if c["cell_type"] == "code")
        assert html.count("hide-input") >= n_solutions, nb.stem
    # navigation in chapter order: each chapter's "next" is the next chapter
    for a, b in zip(chapters, chapters[1:]):
        html = (out / "notebooks" / f"{a.stem}.html").read_text()
        nxt = re.search(r'<a class="right-next"\s+href="([^"]+)"', html)
        assert nxt and nxt.group(1).startswith(b.stem), (a.stem, nxt and nxt.group(1))
    index = (out / "index.html").read_text()
    index_text = " ".join(re.sub(r"<[^>]+>", " ", index).split())
    assert "Reading order" in index_text
    for nb in chapters:  # each chapter's read and run times, from its own first cell
        assert site_build.chapter_time(json.loads(nb.read_text()))[:40] in index_text, nb.stem
    for ck in (ROOT / "data" / "checkpoints").iterdir():
        page = (out / "checkpoints" / f"{ck.name}.html").read_text()
        assert "git_commit" in page and "wall_seconds" in page, ck.name
    assert "FD-clf" in (out / "checkpoints" / "index.html").read_text()
    for doc in ("notation", "architecture", "instructor", "classroom"):
        assert (out / "docs" / f"{doc}.html").is_file(), doc
    students = sorted(p.name for p in out.glob("_downloads/*/*.ipynb")
                      if json.loads(p.read_text())["metadata"].get("minilcm", {}).get("edition") == "student")
    assert students == sorted(f"{nb.stem}.ipynb" for nb in chapters)
    # offline by construction: no address of a CDN in any page or script the site serves
    for f in list(out.rglob("*.html")) + list(out.rglob("*.js")) + list(out.rglob("*.css")):
        src = f.read_text(errors="ignore")
        assert not re.search(r"""(src|href)=["']https?://(cdn|unpkg|fonts\.googleapis)""", src), f


@pytest.mark.slow
def test_site_in_a_real_browser(site):
    _need_browser()
    out, _ = site
    problems, summary = browser.check_site(out)
    assert problems == [], "\n".join(problems[:30])
    assert summary["pages"] >= 19 and summary["images"] >= 30 and summary["typeset"] >= 500, summary
    assert summary["search_hits"] >= 1
    assert summary["seconds"] <= BUDGET_S, summary


def test_browser_check_catches_what_it_claims(tmp_path):
    """A three-page site with one fault of each kind the check promises to find: each is reported."""
    _need_browser()
    (tmp_path / "index.html").write_text(
        "<html><head><title>ok</title></head><body><h1>fine</h1><a href='b.html'>b</a>"
        "<a href='https://example.org/'>an external link is not a request</a></body></html>")
    (tmp_path / "b.html").write_text(
        "<html><head><title>b</title><script src='https://cdn.example.org/x.js'></script></head>"
        "<body><h1>b</h1><p>$$x^2$$ left raw</p><img src='missing.png'><a href='nowhere.html'>x</a>"
        "<script>console.error('boom')</script></body></html>")
    (tmp_path / "c.html").write_text("<html><head><title></title></head><body><p>no heading</p></body></html>")
    problems, summary = browser.check_site(tmp_path)
    text = "\n".join(problems)
    assert "b.html: request outside the site: https://cdn.example.org/x.js" in text
    assert "b.html: maths left untypeset" in text
    assert "b.html: image did not load" in text
    assert "b.html: broken link" in text and "nowhere.html" in text
    assert "b.html: console: boom" in text
    assert "c.html: no title" in text
    assert not any(p.startswith("index.html") for p in problems), problems
