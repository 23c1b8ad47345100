"""The panels in a real browser: papermill executes tests/browser/panel_demo.ipynb (the widget state is saved in the
notebook), nbconvert exports it with local copies of the widget scripts, headless Chromium opens it and Playwright
checks what a person would see: the toggles show their values, the progress bar reached 100%, the loss plot is drawn,
the chat panel shows two columns answering the same message.

Needs Debian's `chromium`, the Python `playwright` package (no browser download: it drives /usr/bin/chromium) and
the npm packages of tests/browser/package.json (`npm ci --prefix tests/browser`). Screenshots go to
tests/artifacts/browser/.
"""
import json, shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BROWSER = ROOT / 'tests' / 'browser'
NODE = BROWSER / 'node_modules'
SCRIPTS = {'require.js': NODE / 'requirejs' / 'require.js',
           'embed-amd.js': NODE / '@jupyter-widgets' / 'html-manager' / 'dist' / 'embed-amd.js'}
ARTIFACTS = ROOT / 'tests' / 'artifacts' / 'browser'
from conftest import chromium_missing
_missing = lambda: chromium_missing(*SCRIPTS.values())


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test needs: {_missing()}")


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    "The demo notebook executed by papermill and exported to HTML next to local copies of the widget scripts."
    import papermill as pm
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    work = tmp_path_factory.mktemp('browser')
    out_nb = work / 'panel_demo.ipynb'
    # the run folder relative to the kernel's folder: the panels (and the screenshots in the docs) show `runs/browser`,
    # not the path of this machine's temporary folder
    pm.execute_notebook(str(BROWSER / 'panel_demo.ipynb'), str(out_nb), parameters={'output_dir': 'runs'},
                        kernel_name='python3', cwd=str(work), progress_bar=False)
    assert (work / 'runs' / 'browser' / 'manifest.json').is_file()
    nb = json.loads(out_nb.read_text(encoding='utf-8'))
    state = nb['metadata']['widgets']['application/vnd.jupyter.widget-state+json']['state']
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for name, src in SCRIPTS.items(): shutil.copy(src, ARTIFACTS / name)
    fonts = ARTIFACTS / '@jupyter-widgets' / 'html-manager' / 'dist'   # where the widget styles look for the icon fonts
    fonts.mkdir(parents=True, exist_ok=True)
    for font in SCRIPTS['embed-amd.js'].parent.glob('*'):
        if font.suffix in ('.woff2', '.woff', '.ttf', '.eot', '.svg'): shutil.copy(font, fonts / font.name)
    c = Config()
    c.HTMLExporter.require_js_url = 'require.js'           # relative to the HTML file: no CDN
    c.HTMLExporter.widget_renderer_url = 'embed-amd.js'
    body, _ = HTMLExporter(config=c).from_filename(str(out_nb))
    assert 'cdn.jsdelivr.net/npm/@jupyter-widgets' not in body
    page = ARTIFACTS / 'panel_demo.html'
    page.write_text(body, encoding='utf-8')
    return {'html': page, 'state': state, 'nb': nb, 'work': work}


def test_widget_state_saved(exported):
    "papermill saved the final widget state: the one stage's bar at 100 and a PNG loss plot."
    st = exported['state']
    bars = [m['state'] for m in st.values() if m['model_name'] == 'IntProgressModel']
    assert [b['value'] for b in bars] == [100], bars
    assert [b['bar_style'] for b in bars] == ['success']
    outs = ''.join(''.join(o.get('text', '')) for c in exported['nb']['cells'] for o in c.get('outputs', []))
    assert 'done' in outs and 'loss points' in outs, outs


LINE_RGB = (31, 119, 180)   # matplotlib's first line colour, #1f77b4

PIXELS_JS = """(img) => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - %d) < 30 && Math.abs(d[i+1] - %d) < 30 && Math.abs(d[i+2] - %d) < 30) n++;
  return {w: img.naturalWidth, h: img.naturalHeight, line: n};
}""" % LINE_RGB


def test_panels_in_chromium(exported, chromium_page):
    "Chromium shows the saved widgets: toggles with their values, a full progress bar, a drawn loss curve."
    page, errors = chromium_page
    page.goto(exported['html'].as_uri())
    page.wait_for_selector('.widget-tab', timeout=60_000)
    page.wait_for_selector('img.widget-image', timeout=60_000)
    page.wait_for_timeout(500)
    page.screenshot(path=str(ARTIFACTS / 'panels.png'), full_page=True)
    # what the screenshots show names no folder of this machine (they go into the docs: nbs/images/*_panel.png)
    text = page.locator('body').inner_text()
    assert 'runs/browser' in text and str(exported['work']) not in text and '/tmp/' not in text, text[:2000]
    # TechniquePanel: the Model tab shows quantization 'none'; the PEFT tab shows 'both', lora_r 8, prefix 4
    tabs = page.locator('.widget-tab').first
    active = lambda: [t.inner_text().strip() for t in tabs.locator('.widget-toggle-button.mod-active').all() if t.is_visible()]
    assert active() == ['auto', 'none'], active()
    tabs.locator('.lm-TabBar-tab', has_text='PEFT').click()
    page.wait_for_timeout(300)
    assert 'both' in active(), active()
    lora_r = tabs.locator('.widget-inline-hbox', has_text='lora_r').locator('input').first
    assert lora_r.input_value() == '8'
    prefix = tabs.locator('.widget-inline-hbox', has_text='prefix_tokens').locator('input').first
    assert prefix.input_value() == '4'
    tp_box = page.locator('.widget-vbox', has=page.locator('.widget-tab')).first
    tp_box.screenshot(path=str(ARTIFACTS / 'technique_panel.png'))   # on the PEFT tab
    tabs.locator('.lm-TabBar-tab', has_text='Patches').click()
    page.wait_for_timeout(300)
    gqa = tabs.locator('.widget-checkbox', has_text='use_gqa').locator('input[type=checkbox]').first
    assert gqa.is_checked()
    rwkv = tabs.locator('.widget-checkbox', has_text='use_rwkv').locator('input[type=checkbox]').first
    assert not rwkv.is_checked()
    # RunPanel: the stage's bar is full, the loss plot has its line drawn
    bar = page.locator('.widget-hprogress .progress-bar').first
    bar_w = bar.evaluate('e => e.getBoundingClientRect().width')
    track_w = bar.evaluate('e => e.parentElement.getBoundingClientRect().width')
    assert bar_w > 0 and abs(bar_w - track_w) <= 1, (bar_w, track_w)
    imgs = page.locator('img.widget-image')
    assert imgs.count() == 2      # the run panel's and the compare panel's loss plots
    run_plot = imgs.nth(0).evaluate(PIXELS_JS)
    assert run_plot['w'] > 100 and run_plot['line'] > 100, run_plot
    run_box = page.locator('.widget-vbox', has=page.locator('.widget-hprogress')).first
    run_box.screenshot(path=str(ARTIFACTS / 'run_panel.png'))
    # ComparePanel: the run is listed and selected; its curve is drawn
    sel = page.locator('.widget-select-multiple select').first
    assert sel.evaluate('e => Array.from(e.selectedOptions).map(o => o.textContent)') == ['browser']
    cmp_plot = imgs.nth(1).evaluate(PIXELS_JS)
    assert cmp_plot['line'] > 100, cmp_plot
    page.locator('.widget-vbox', has=page.locator('.widget-select-multiple')).first.screenshot(
        path=str(ARTIFACTS / 'compare_panel.png'))
    # ChatPanel: two columns (base, final), each with the message and the answer the model streamed into it
    cols = page.locator('.chat-column')
    assert cols.count() == 2, cols.count()
    heads = [cols.nth(i).locator('h4').inner_text().strip() for i in range(2)]
    assert heads == ['base', 'final'], heads
    for i, name in enumerate(heads):
        t = cols.nth(i).inner_text()
        assert 'you: สวัสดี' in t and f'{name}:' in t.split('you: สวัสดี', 1)[1], t
    page.locator('.widget-vbox', has=page.locator('.chat-column')).last.screenshot(path=str(ARTIFACTS / 'chat_panel.png'))
    assert not errors, errors
