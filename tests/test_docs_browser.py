"""Every page of the offline docs site in headless Chromium (Debian `chromium`, driven by Playwright; no browser
download). Opens every page the build wrote (every notebook `find_notebooks` lists) and fails on a broken internal
link or anchor, an image that does not load, error text in a page (a Python traceback, papermill's "An Exception was
encountered" and "encountered an exception here and stopped" banners), a page missing from the navigation, or a
JavaScript error. The home page's screenshot goes to tests/artifacts/docs/home.png.
"""
import json
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
  images: Array.from(document.images).map(i => [i.src, i.complete ? i.naturalWidth : 0]),
  pmErrorCells: document.querySelectorAll('#papermill-error-cell, a[href="#papermill-error-cell"]').length,
})"""

# text a reader must never meet: a failed execution saved into a page
ERROR_TEXT = ('Traceback (most recent call last)', 'An Exception was encountered at',
              'Execution using papermill encountered an exception')


def check_pages(site:Path, hrefs:list, expected_nav:list, page, js_errors:list, shot:dict|None=None) -> tuple[dict, list]:
    "Open every page of `hrefs` in `site`; what each page shows (PAGE_JS) and the list of problems found."
    pages, problems = {}, []
    for href in hrefs:
        js_errors.clear()
        page.goto((site / href).as_uri())
        info = pages[href] = page.evaluate(PAGE_JS)
        if shot and href in shot: page.screenshot(path=str(shot[href]))
        if info['nav'] != expected_nav: problems.append(f"{href}: navigation differs from sidebar.yml")
        if info['active'] != [href]: problems.append(f"{href}: marked {info['active']} as the current page")
        problems += [f"{href}: error text {t!r} in the page" for t in ERROR_TEXT if t in info['text']]
        if info['errors']: problems.append(f"{href}: {info['errors']} error output(s) in the page")
        if info['pmErrorCells']: problems.append(f"{href}: papermill's error cell in the page")
        for src, w in info['images']:
            if w == 0 and not src.startswith(('http:', 'https:')): problems.append(f"{href}: image {src[:120]} did not load")
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
    return pages, problems


def test_every_page_in_chromium(tmp_path, chromium_page):
    from typhoon_nb.site import build_site, read_sidebar, find_notebooks
    site = tmp_path / 'site'
    rep = build_site(NBS, site)
    assert rep.warnings == [], rep.warnings
    hrefs = [h for _, h, _ in rep.pages]
    assert len(hrefs) == len(find_notebooks(NBS)) > 30, (len(hrefs), len(find_notebooks(NBS)))
    expected_nav = [e.href for s in read_sidebar(NBS / 'sidebar.yml') for e in s.entries]
    ART.mkdir(parents=True, exist_ok=True)
    pages, problems = check_pages(site, hrefs, expected_nav, *chromium_page, shot={'index.html': ART / 'home.png'})
    assert sorted(pages) == sorted(hrefs)      # every page opened
    missing_nav = [h for h in pages if h not in expected_nav]
    assert not missing_nav, f"pages without a navigation entry: {missing_nav}"
    assert not problems, '\n'.join(problems)
    assert (ART / 'home.png').stat().st_size > 10_000


def test_the_check_finds_what_a_reader_would_trip_over(tmp_path, chromium_page):
    "A small site with one broken page of each kind: the check reports every one (so a clean run means something)."
    from typhoon_nb.site import build_site
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    def write(name, *cells):
        nb = {'cells': [{'cell_type': t, 'id': f'c{i}', 'metadata': {}, 'source': s} | ({'outputs': (o or [[]])[0], 'execution_count': 1} if t == 'code' else {})
                        for i, (t, s, *o) in enumerate(cells)], 'nbformat': 4, 'nbformat_minor': 5,
              'metadata': {'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'Python 3'}}}
        (nbs / name).write_text(json.dumps(nb), encoding='utf-8')
    write('index.ipynb', ('markdown', '# Home\n\n> Fine.'), ('markdown', 'See [the banner page](banner.ipynb).'))
    write('banner.ipynb', ('markdown', '# Banner'),
          ('markdown', '<span id="papermill-error-cell" style="color:red">Execution using papermill encountered an exception here and stopped:</span>'))
    write('traceback.ipynb', ('markdown', '# Traceback'),
          ('code', 'f()', [{'output_type': 'stream', 'name': 'stderr', 'text': 'Traceback (most recent call last):\n  File "x"\nKeyError: 1\n'}]))
    write('image.ipynb', ('markdown', '# Image'), ('markdown', '![a plot](images/missing.png) and [a gap](nowhere.html)'))
    (nbs / 'sidebar.yml').write_text("website:\n  sidebar:\n    contents: [index.ipynb, banner.ipynb, traceback.ipynb, image.ipynb]\n")
    site = tmp_path / 'site'
    rep = build_site(nbs, site)
    assert len(rep.warnings) >= 3, rep.warnings      # the build says so too; here: what the browser sees
    nav = ['index.html', 'banner.html', 'traceback.html', 'image.html']
    pages, problems = check_pages(site, [h for _, h, _ in rep.pages], nav, *chromium_page)
    assert len(pages) == 4
    text = '\n'.join(problems)
    for want in ("banner.html: error text 'Execution using papermill encountered an exception' in the page",
                 "banner.html: papermill's error cell in the page",
                 "traceback.html: error text 'Traceback (most recent call last)' in the page",
                 "image.html: image file://", "images/missing.png did not load", "image.html: broken link file://"):
        assert want in text, (want, text)
    assert not [p for p in problems if p.startswith('index.html')], problems
