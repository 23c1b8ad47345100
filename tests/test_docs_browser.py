"""Every page of the offline docs site in headless Chromium (Debian `chromium`, driven by Playwright; no browser
download). Fails on a broken internal link or anchor, a Python traceback in a page, a page missing from the
navigation, or a JavaScript error. The home page's screenshot goes to tests/artifacts/docs/home.png.
"""
from pathlib import Path
from urllib.parse import urlparse, unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
ART = ROOT / 'tests' / 'artifacts' / 'docs'
from conftest import chromium_missing

pytestmark = pytest.mark.skipif(chromium_missing() is not None, reason=f"docs browser check needs: {chromium_missing()}")

PAGE_JS = """() => ({
  ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id),
  links: Array.from(document.querySelectorAll('a[href], img[src], link[href]')).map(e => e.href || e.src),
  nav: Array.from(document.querySelectorAll('nav#sidebar a')).map(a => a.getAttribute('data-nav')),
  active: Array.from(document.querySelectorAll('nav#sidebar a.active')).map(a => a.getAttribute('data-nav')),
  text: document.body.innerText,
  errors: document.querySelectorAll('.output_error').length,
  images: Array.from(document.images).map(i => [i.src, i.naturalWidth]),
})"""


def test_every_page_in_chromium(tmp_path, chromium_page):
    from typhoon_nb.site import build_site, read_sidebar
    site = tmp_path / 'site'
    rep = build_site(NBS, site)
    assert rep.warnings == [], rep.warnings
    expected_nav = [e.href for s in read_sidebar(NBS / 'sidebar.yml') for e in s.entries]
    pages = {href: None for _, href, _ in rep.pages}
    problems = []
    ART.mkdir(parents=True, exist_ok=True)
    page, js_errors = chromium_page
    for href in pages:
        js_errors.clear()
        page.goto((site / href).as_uri())
        info = page.evaluate(PAGE_JS)
        if href == 'index.html': page.screenshot(path=str(ART / 'home.png'))
        pages[href] = info
        if info['nav'] != expected_nav: problems.append(f"{href}: navigation differs from sidebar.yml")
        if info['active'] != [href]: problems.append(f"{href}: marked {info['active']} as the current page")
        if 'Traceback (most recent call last)' in info['text'] or info['errors']:
            problems.append(f"{href}: a Python traceback in the page")
        for src, w in info['images']:
            if src.startswith('file:') and w == 0: problems.append(f"{href}: image {src} did not load")
        problems += [f"{href}: JavaScript error {e}" for e in js_errors]
    for href, info in pages.items():
        for url in info['links']:
            u = urlparse(url)
            if u.scheme != 'file': continue
            target = Path(unquote(u.path))
            if not target.is_file(): problems.append(f"{href}: broken link {url}"); continue
            rel = target.relative_to(site).as_posix()
            if u.fragment and rel in pages and u.fragment not in pages[rel]['ids']:
                problems.append(f"{href}: link to {rel}#{u.fragment}: no such anchor")
    missing_nav = [h for h in pages if h not in expected_nav]
    assert not missing_nav, f"pages without a navigation entry: {missing_nav}"
    assert not problems, '\n'.join(problems)
    assert (ART / 'home.png').stat().st_size > 10_000
