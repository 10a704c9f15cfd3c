"""Open every page of the built site in headless Chromium, the way a reader meets it, and report what is wrong.

    python docs/site/site_browser.py [SITE_DIR] [--screenshots DIR]

The site is served from its folder on 127.0.0.1 (as a classroom would serve it) and each page is checked:
  - its title renders (a non-empty <h1> and <title>);
  - MathJax has typeset it: no raw ``$$``, ``\\(`` or ``\\[`` is left in the text, and pages with maths hold
    ``mjx-container`` elements;
  - every image has loaded (``naturalWidth > 0``);
  - the console shows no errors and no script raised;
  - no request leaves the site folder (anything but http://127.0.0.1:<port>/ is blocked and reported);
  - every internal link resolves to a file of the site (and its #fragment, where it has one, to an id on that page).
The browser is Debian's ``chromium`` (``/usr/bin/chromium``, or $MINILCM_CHROMIUM), driven by playwright from PyPI:
no browser is downloaded. Exit code 0 when every page passes, 1 otherwise.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

MATH_LEFT = ["$$", "\\(", "\\["]
DESKTOP, PHONE = {"width": 1280, "height": 860}, {"width": 390, "height": 844}


def chromium_path() -> str | None:
    return os.environ.get("MINILCM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path):
    """A static server of ``folder`` on a free port of 127.0.0.1, in a thread; returns (server, base url)."""
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def pages(site: Path) -> list[str]:
    """Every HTML page of the site, relative to it (Sphinx's generated index and search pages included)."""
    return sorted(str(p.relative_to(site)) for p in site.rglob("*.html") if "_static" not in p.parts)


# Wait for MathJax: Sphinx sets window.MathJax to its configuration, which MathJax replaces once it has loaded;
# startup.promise resolves when the page is typeset. Pages without maths have no MathJax at all.
_TYPESET = """async () => {
  for (let i = 0; i < 400 && window.MathJax && !(MathJax.startup && MathJax.startup.promise); i++)
    await new Promise(r => setTimeout(r, 25));
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  await document.fonts.ready;  // MathJax's fonts load after typesetting
}"""

_PAGE_FACTS = """() => {
  const text = document.body.innerText;
  return {
    title: document.title,
    h1: (document.querySelector('main h1, article h1, h1') || {innerText: ''}).innerText.trim(),
    mathjax: document.querySelectorAll('mjx-container').length,
    mathNodes: document.querySelectorAll('.math').length,
    rawMath: %s.filter(s => text.includes(s)),
    brokenImages: Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
    images: document.images.length,
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  };
}""" % repr(MATH_LEFT).replace("'", '"')


def check_site(site: Path, screenshots: Path | None = None) -> tuple[list[str], dict]:
    """Every problem found on every page (empty when the site passes), and a summary of what was checked."""
    from playwright.sync_api import sync_playwright

    site = Path(site).resolve()
    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no Chromium: apt-get install chromium (or set MINILCM_CHROMIUM=/path/to/chrome)")
    server, base = serve(site)
    problems, outside, facts = [], [], {}
    t0 = time.perf_counter()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
            context = browser.new_context(viewport=DESKTOP)

            def route(r):
                if r.request.url.startswith(base):
                    r.continue_()
                else:
                    outside.append(r.request.url)
                    r.abort()
            context.route("**/*", route)
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("response", lambda r: errors.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            for rel in pages(site):
                errors.clear()
                n_outside = len(outside)
                page.goto(base + rel, wait_until="load")
                page.evaluate(_TYPESET)
                f = page.evaluate(_PAGE_FACTS)
                facts[rel] = f
                where = f"{rel}:"
                special = rel in ("genindex.html", "search.html")
                if not f["title"].strip() or (not f["h1"] and not special):
                    problems.append(f"{where} no title (title {f['title']!r}, h1 {f['h1']!r})")
                if f["rawMath"]:
                    problems.append(f"{where} maths left untypeset: {f['rawMath']}")
                if f["mathNodes"] and not f["mathjax"]:
                    problems.append(f"{where} {f['mathNodes']} maths nodes but nothing typeset by MathJax")
                problems += [f"{where} image did not load: {src}" for src in f["brokenImages"]]
                problems += [f"{where} console: {e}" for e in errors]
                problems += [f"{where} request outside the site: {u}" for u in outside[n_outside:]]
                for href in f["links"]:
                    url, frag = urldefrag(href)
                    if not url.startswith(base):
                        continue  # an external link is not a request; following it is the reader's choice
                    target = site / unquote(urlparse(url).path[len(urlparse(base).path):])
                    if target.is_dir():
                        target = target / "index.html"
                    if not target.is_file():
                        problems.append(f"{where} broken link: {href}")
                    elif frag and target.suffix == ".html" and target == site / rel and frag not in f["ids"]:
                        problems.append(f"{where} link to a missing anchor: {href}")
            search_hits = search(page, base, "skipping")
            if not search_hits:
                problems.append("search.html: searching 'skipping' found nothing")
            if screenshots is not None:
                shoot(browser, base, site, Path(screenshots))
            browser.close()
    finally:
        server.shutdown()
    summary = {"pages": len(facts), "seconds": round(time.perf_counter() - t0, 1),
               "images": sum(f["images"] for f in facts.values()),
               "typeset": sum(f["mathjax"] for f in facts.values()),
               "links": sum(len(f["links"]) for f in facts.values()), "blocked": len(outside),
               "search_hits": search_hits}
    return problems, summary


def search(page, base: str, word: str) -> int:
    """The number of pages the site's own search box finds for ``word`` (its index is a local searchindex.js)."""
    page.goto(base + "search.html?q=" + word, wait_until="load")
    try:
        page.wait_for_selector("#search-results ul.search li", timeout=15_000)
    except Exception:  # playwright's TimeoutError: no result appeared
        return 0
    return page.locator("#search-results ul.search li").count()


SHOTS = [("index.html", "index"), ("notebooks/01_ddpm.html", "ch01"),
         ("notebooks/05_latent_consistency.html", "ch05")]


def shoot(browser, base: str, site: Path, folder: Path) -> list[Path]:
    """Screenshots of the index and two chapters, at a desktop and a phone width (the top of each page)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for size, tag in ((DESKTOP, "desktop"), (PHONE, "phone")):
        ctx = browser.new_context(viewport=size, device_scale_factor=1)
        ctx.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base) else r.abort())
        page = ctx.new_page()
        for rel, name in SHOTS:
            page.goto(base + rel, wait_until="load")
            page.evaluate(_TYPESET)
            if name.startswith("ch"):  # a chapter at its first exercise: prose, maths, a collapsed solution
                page.locator("h3", has_text="Exercise").first.scroll_into_view_if_needed()
                page.evaluate("() => window.scrollBy(0, -16)")
            path = folder / f"{name}-{tag}.png"
            page.screenshot(path=str(path))
            from PIL import Image  # a 256-colour palette: a third of the size, the text as sharp
            Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)
            out.append(path)
        ctx.close()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    shots = None
    if "--screenshots" in argv:
        i = argv.index("--screenshots")
        shots, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    site = Path(argv[0]) if argv else Path(__file__).resolve().parents[2] / "build" / "site"
    if not (site / "index.html").is_file():
        print(f"no site at {site}: run `make site` first", file=sys.stderr)
        return 2
    problems, summary = check_site(site, shots)
    for p in problems:
        print(p)
    print(f"{summary['pages']} pages, {summary['images']} images, {summary['typeset']} formulas typeset, "
          f"{summary['links']} links, {summary['blocked']} outside requests blocked, search 'skipping' "
          f"{summary['search_hits']} pages, {summary['seconds']} s: "
          f"{'PASS' if not problems else f'{len(problems)} problems'}")
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
