"""The training core has one room per concern: `stages` tells the story of a run, `runfolder`, `checkpoints` and
`trainers` hold the rest; each module stays readable, `run()` reads as its numbered steps, and the names users and docs
import from `typhoon_nb.stages` keep working."""
import ast, inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ['stages', 'runfolder', 'checkpoints', 'trainers']


@pytest.mark.parametrize('mod', CORE)
def test_core_module_is_short_and_has_its_notebook(mod):
    src = (ROOT / 'typhoon_nb' / f'{mod}.py').read_text(encoding='utf-8')
    assert len(src.splitlines()) < 350, f"typhoon_nb/{mod}.py: {len(src.splitlines())} lines"
    nb = src.split('File to edit: ../nbs/', 1)[1].split('.', 1)[0] + '.ipynb'
    assert (ROOT / 'nbs' / nb).is_file() and f'#| default_exp {mod}' in (ROOT / 'nbs' / nb).read_text(encoding='utf-8')


def test_run_reads_as_its_steps():
    from typhoon_nb import stages
    body = [l for l in inspect.getsource(stages.run).splitlines() if l.strip()]
    assert len(body) < 60, len(body)
    calls = {n.func.id for n in ast.walk(ast.parse(inspect.getsource(stages.run))) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {'start_run', 'plan_run', 'load_run_data', 'load_run_model', 'run_stage', 'finish_run', 'fail_run'} <= calls


def test_names_users_import_from_stages_still_work():
    from typhoon_nb import stages, runfolder, checkpoints, trainers
    from typhoon_nb.stages import run, RunResult, demo, RunError  # noqa: F401  (the docs' and users' imports)
    moved = {runfolder: ['RunError', 'StageResult', 'RunResult', 'read_metrics', 'eval_figure', 'plot_run', 'stage_dir'],
             checkpoints: ['verify_checkpoint', 'last_complete_checkpoint', 'mark_complete', 'COMPLETE', 'load_full_weights',
                           'refuse_pickle_weights', 'atomic_dir'],
             trainers: ['build_trainer', 'keep_adapter_dtype', 'dpo_reference_context']}
    for mod, names in moved.items():
        for n in names: assert getattr(stages, n) is getattr(mod, n), n


def test_the_core_does_not_import_the_run():
    "The rooms do not import the story (no cycle): stages imports them, never the other way round."
    for mod in CORE[1:]:
        src = (ROOT / 'typhoon_nb' / f'{mod}.py').read_text(encoding='utf-8')
        assert 'from .stages' not in src and 'typhoon_nb.stages' not in src, mod
