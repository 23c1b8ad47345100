"""The offline docs site: `make docs` builds nbs/ with `typhoon_nb.site.build_site`; this test runs the same build.

It asserts what a reader and Quarto would trip over: every sidebar entry has a page and every page a sidebar entry,
no links to missing pages or anchors, no show_doc name that fails to resolve (the report's warnings are empty);
the sections the docs promise; show_doc output on the API pages; the `#|` options applied; no traceback saved in any
page; images copied. The built site is left in tests/artifacts/docs/site for the browser test and for inspection.
"""
import re, shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
SITE = ROOT / 'tests' / 'artifacts' / 'docs' / 'site'
SECTIONS = ['Get started', 'Tutorials', 'Techniques', 'API', 'Benchmarks']
TUTORIALS = ['quickstart', 'qlora_thai_data', 'typhoon7b_colab', 'pretrain_sft_dpo', 'architecture_patches', 'jobs_and_sweeps']
TECHNIQUES = ['peft', 'qlora', 'multi_stage', 'dpo', 'linear_attention', 'moe', 'gqa', 'refinements']


@pytest.fixture(scope='module')
def report():
    from typhoon_nb.site import build_site
    return build_site(NBS, SITE)


def test_no_warnings(report):
    "No missing page, no page without navigation, no broken link or anchor, no unresolved show_doc."
    assert report.warnings == [], '\n'.join(report.warnings)


def test_sections_and_pages(report):
    from typhoon_nb.site import read_sidebar, find_notebooks
    nav = read_sidebar(NBS / 'sidebar.yml')
    assert [s.title for s in nav] == SECTIONS
    by = {s.title: [e.src for e in s.entries] for s in nav}
    assert by['Tutorials'] + by['Get started'][1:2] == [f'tutorials/{t}.ipynb' for t in TUTORIALS[1:]] + ['tutorials/quickstart.ipynb']
    assert by['Techniques'] == [f'techniques/{t}.ipynb' for t in TECHNIQUES]
    assert by['Benchmarks'] == sorted(p for p in find_notebooks(NBS) if p.startswith('benchmarks/'))
    # one API page per module notebook: every numbered notebook with a default_exp
    api = sorted(p for p in find_notebooks(NBS) if '/' not in p and re.match(r'\d', p))
    assert by['API'] == api
    assert len(report.pages) == len(find_notebooks(NBS))
    for src, href, title in report.pages: assert (SITE / href).is_file(), href


def _page(name): return (SITE / name).read_text(encoding='utf-8')


def test_api_pages_have_show_doc():
    "Exported functions get their signature and docstring; the source link carries a line number."
    cfg = _page('config.html')
    assert '<h1 class="title">Config</h1>' in cfg
    assert 'id="stage_view"' in cfg and 'cfg <span class="p">:</span>' not in cfg
    assert re.search(r'href="https://github.com/typhoon-nb/typhoon-nb/blob/main/typhoon_nb/config.py#L\d+"', cfg)
    assert 'applied' in cfg    # the docstring of stage_view: "`cfg` with `stage.overrides` applied."
    site = _page('site.html')
    for name in ('build_site', 'process_notebook', 'read_sidebar', 'page_href'): assert f'id="{name}"' in site, name


def test_directives_applied():
    "hide/export cells and `#|` lines never reach a page; eval: false cells are shown; links to notebooks became pages."
    for href in ('config.html', 'data.html', 'tutorials/quickstart.html', 'techniques/qlora.html'):
        body = _page(href)
        assert '#|' not in body and 'default_exp' not in body and 'from fastcore.test import' not in body, href
    qs = _page('tutorials/quickstart.html')
    assert 'enable_custom_widget_manager' in qs                  # an eval: false cell, shown
    assert 'href="../jobs/train.html"' in qs and '.ipynb"' not in qs
    assert 'src="../images/technique_panel.png"' in qs and (SITE / 'images' / 'technique_panel.png').is_file()


def test_nav_on_every_page(report):
    "Every page carries the whole sidebar, with itself marked active."
    n_entries = sum(1 for _ in re.finditer(r'\n\s*- (?!section)', (NBS / 'sidebar.yml').read_text()))
    for _, href, title in report.pages:
        body = _page(href)
        assert len(re.findall(r'<a href="[^"]*"(?: class="active")? data-nav="', body)) == n_entries, href
        assert f'class="active" data-nav="{href}"' in body, href


def test_no_traceback_in_pages(report):
    for _, href, _ in report.pages:
        body = _page(href)
        assert 'Traceback (most recent call last)' not in body and 'output_error' not in body, href


def test_build_flags_missing_pages(tmp_path):
    "A sidebar entry without a notebook and a notebook without an entry are both reported."
    from typhoon_nb.site import build_site
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    shutil.copy(NBS / 'techniques' / 'gqa.ipynb', nbs / 'gqa.ipynb')
    shutil.copy(NBS / 'techniques' / 'moe.ipynb', nbs / 'moe.ipynb')
    (nbs / 'sidebar.yml').write_text("website:\n  sidebar:\n    contents:\n      - section: T\n        contents: [gqa.ipynb, nope.ipynb]\n")
    rep = build_site(nbs, tmp_path / 'site')
    assert any("lists nope.ipynb, which does not exist" in w for w in rep.warnings), rep.warnings
    assert any("moe.ipynb has no entry in" in w for w in rep.warnings), rep.warnings
    # links from the technique pages to API notebooks that are not part of this small site
    assert any(w.startswith('gqa.html: link to ../patches_gqa.html') for w in rep.warnings), rep.warnings


def test_main_exit_status(tmp_path):
    from typhoon_nb.site import main
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    import nbformat
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell('# Home\n\n> A one-page site.')])
    nbformat.write(nb, nbs / 'index.ipynb')
    (nbs / 'sidebar.yml').write_text("website:\n  sidebar:\n    contents: [index.ipynb]\n")
    assert main([str(nbs), str(tmp_path / 'ok')]) == 0
    (nbs / 'sidebar.yml').write_text("website:\n  sidebar:\n    contents: [index.ipynb, missing.ipynb]\n")
    assert main([str(nbs), str(tmp_path / 'bad')]) == 1


def test_quickstart_shows_its_install_cell():
    "The Colab instruction ends at a colon: the `%pip install` line follows it, as code."
    qs = _page('tutorials/quickstart.html')
    i = qs.index('install the package into the running kernel instead:')
    after = qs[i:i + 2000]
    assert '<pre>' in after, after
    text = re.sub(r'<[^>]+>', '', after[after.index('<pre>'):after.index('</pre>')])    # the code, without highlighting
    assert text.strip() == '%pip install -q "git+https://github.com/typhoon-nb/typhoon-nb"', text
    assert 'papermill-error-cell' not in qs and 'An Exception was encountered' not in qs


_TB = 'Traceback (most recent call last):\n  File "<stdin>", line 1, in <module>\nKeyError: 1\n'
BROKEN = {  # one page per kind of failure: the cells after the title, and what the build must say
    'banner': ([{'cell_type': 'markdown', 'metadata': {'tags': ['papermill-error-cell-tag']},
                 'source': '<span id="papermill-error-cell" style="color:red">Execution using papermill encountered an exception here and stopped:</span>'}],
               "cell 1 (id c1): papermill's error banner"),
    'error_output': ([{'cell_type': 'code', 'metadata': {}, 'source': 'f()', 'execution_count': 1,
                       'outputs': [{'output_type': 'error', 'ename': 'KeyError', 'evalue': '1', 'traceback': [_TB]}]}],
                     'cell 1 (id c1): an error output (KeyError: 1)'),
    'printed_traceback': ([{'cell_type': 'code', 'metadata': {}, 'source': 'f()', 'execution_count': 1,
                            'outputs': [{'output_type': 'stream', 'name': 'stderr', 'text': [_TB]}]}],
                          'cell 1 (id c1): a Python traceback in an output'),
    'lost_cell': ([{'cell_type': 'code', 'metadata': {}, 'source': '%load_ext autoreload', 'execution_count': None, 'outputs': []}],
                  "cell 1 (id c1): not hidden, but nothing of it reaches the page ('%load_ext autoreload')"),
}

@pytest.mark.parametrize('kind', list(BROKEN))
def test_build_fails_on_a_broken_page(kind, tmp_path, capsys):
    "`make docs` (site.main) exits 1 and names the notebook and the cell, for each kind of broken page."
    import json
    from typhoon_nb.site import main
    nbs = tmp_path / 'nbs'; nbs.mkdir()
    cells, says = BROKEN[kind]
    title = {'cell_type': 'markdown', 'metadata': {}, 'source': '# Home\n\n> A one-page site.'}
    nb = {'cells': [{**c, 'id': f'c{i}'} for i, c in enumerate([title] + cells)], 'nbformat': 4, 'nbformat_minor': 5,
          'metadata': {'kernelspec': {'name': 'python3', 'language': 'python', 'display_name': 'Python 3'}}}
    (nbs / 'index.ipynb').write_text(json.dumps(nb), encoding='utf-8')
    (nbs / 'sidebar.yml').write_text("website:\n  sidebar:\n    contents: [index.ipynb]\n")
    assert main([str(nbs), str(tmp_path / 'site')]) == 1
    out = capsys.readouterr().out
    assert f"warning: {nbs / 'index.ipynb'}: {says}" in out, out


def _committed_notebooks():
    import subprocess
    files = subprocess.run(['git', 'ls-files', '*.ipynb'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / f for f in files if (ROOT / f).is_file()]

# a path that only exists on the machine that ran the notebook: pytest's temporary folders, a home folder
MACHINE_PATH = re.compile(r'/tmp/pytest-of-|/root/|/home/[^/\s"\'\\]+/|/Users/[^/\s"\'\\]+/|[A-Za-z]:\\\\Users\\\\')

def test_no_machine_paths_or_error_cells_in_committed_notebooks():
    "No committed notebook output shows a path of the machine that ran it, and no notebook keeps a failed execution."
    import json
    from typhoon_nb.site import error_cells
    nbs = _committed_notebooks()
    assert len(nbs) > 30, len(nbs)
    problems = []
    for p in nbs:
        cells = json.loads(p.read_text(encoding='utf-8'))['cells']
        rel = p.relative_to(ROOT)
        problems += [f"{rel}: {x}" for x in error_cells(cells)]
        for i, c in enumerate(cells):
            for m in {m.group(0) for o in c.get('outputs', []) for m in MACHINE_PATH.finditer(json.dumps(o, ensure_ascii=False))}:
                problems.append(f"{rel}: cell {i} (id {c.get('id')}): output shows the machine path {m!r}")
    assert not problems, '\n'.join(problems)
