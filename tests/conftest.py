import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

BENCH = ROOT / 'nbs' / 'benchmarks'

def execute_bench(tmp_path, name, **params):
    "Run benchmark notebook `name` with `params` in a temporary folder (offline, one torch thread); return its JSON record."
    import json, papermill as pm
    out = tmp_path / f'{name}.json'
    env = {'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pm.execute_notebook(str(BENCH / f'{name}.ipynb'), str(tmp_path / f'{name}.ipynb'), cwd=str(tmp_path), kernel_name='python3',
                            parameters=params | {'out_json': str(out)}, progress_bar=False)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return json.loads(out.read_text())

def pytest_configure(config):
    for m in ('slow: long-running (skipped unless --runslow)', 'cuda: needs a GPU'):
        config.addinivalue_line('markers', m)


# --- headless Chromium for the browser tests (Debian's `chromium`, driven by Playwright: no browser download) -----
CHROMIUM = Path(os.environ.get('TYPHOON_NB_CHROMIUM', '/usr/bin/chromium'))

def chromium_missing(*files:Path) -> str | None:
    "Why the browser tests cannot run here (None when they can): Chromium, playwright, nbconvert, and `files` (npm scripts)."
    if not CHROMIUM.is_file(): return f"{CHROMIUM} not found (apt-get install -y --no-install-recommends chromium)"
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return "Python package playwright not installed (pip install playwright; no browser download needed)"
    for p in files:
        if not Path(p).is_file(): return f"{p} not found (npm ci --prefix tests/browser)"
    try: import nbconvert  # noqa: F401
    except ImportError: return "nbconvert not installed (pip install nbconvert)"
    return None

@pytest.fixture
def chromium_page():
    "A headless Chromium page (file URLs allowed) and the list its JavaScript errors go to; closed after the test."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                     args=['--no-sandbox', '--allow-file-access-from-files', '--disable-gpu'])
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            errors = []
            page.on('pageerror', lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()
