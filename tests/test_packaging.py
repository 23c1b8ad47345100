"""What `make demo` installs is what the package imports: every import that runs when a module loads names a declared
runtime requirement (settings.ini `requirements`), not only a dev one."""
import ast, configparser, re, sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _canon(name): return re.sub(r'[-_.]+', '-', name).lower()


def runtime_requirements():
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    return {_canon(re.split(r'[<>=!~;\[ ]', r, maxsplit=1)[0]) for r in cfg['DEFAULT']['requirements'].split()}


def load_time_imports(src: str):
    "Top-level module names imported when the module loads (not inside a function body)."
    out = set()
    def visit(node):
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)): continue
            if isinstance(ch, ast.Import): out.update(a.name.split('.')[0] for a in ch.names)
            elif isinstance(ch, ast.ImportFrom) and not ch.level and ch.module: out.add(ch.module.split('.')[0])
            visit(ch)
    visit(ast.parse(src))
    return out


def test_load_time_imports_are_runtime_requirements():
    dists, reqs, bad = packages_distributions(), runtime_requirements(), []
    for f in sorted((ROOT / 'typhoon_nb').rglob('*.py')):
        for mod in sorted(load_time_imports(f.read_text(encoding='utf-8'))):
            if mod in sys.stdlib_module_names or mod in ('typhoon_nb', '__future__'): continue
            names = {_canon(d) for d in dists.get(mod, [mod])}
            if not names & reqs: bad.append(f"{f.relative_to(ROOT)} imports {mod} ({', '.join(sorted(names))}) at load time")
    assert not bad, "not in settings.ini requirements:\n" + '\n'.join(bad)


def test_job_notebook_imports_are_runtime_requirements():
    "The job notebook (what `make demo` and `typhoon-nb train` execute) imports only what the package installs."
    import json
    dists, reqs, bad = packages_distributions(), runtime_requirements(), []
    for nb in sorted((ROOT / 'nbs' / 'jobs').glob('*.ipynb')):
        for i, c in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
            if c['cell_type'] != 'code': continue
            src = '\n'.join(l for l in ''.join(c['source']).splitlines() if not l.lstrip().startswith(('%', '!')))
            for mod in sorted(load_time_imports(src)):
                if mod in sys.stdlib_module_names or mod in ('typhoon_nb', '__future__'): continue
                if not {_canon(d) for d in dists.get(mod, [mod])} & reqs: bad.append(f"{nb.name} cell {i} imports {mod}")
    assert not bad, "not in settings.ini requirements:\n" + '\n'.join(bad)


def test_the_check_sees_a_dev_only_import():
    assert load_time_imports("import os\nfrom fastcore.basics import patch\ndef f():\n    import nbdev\n") == {'os', 'fastcore'}
    reqs = runtime_requirements()
    assert {'torch', 'transformers', 'peft', 'trl'} <= reqs and 'nbdev' not in reqs and 'pytest' not in reqs
