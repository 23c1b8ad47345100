"The demo-seeds benchmark, executed by papermill with smoke parameters (micro model, two seeds, a few steps): the record it writes."
import json, math, os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / 'nbs' / 'benchmarks' / 'demo_seeds.ipynb'

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    import papermill as pm
    from typhoon_nb.loader import resolve_precision
    folder = tmp_path_factory.mktemp('demo_seeds')
    out = folder / 'demo_seeds.json'
    import torch
    cpu = {torch.float32: 'fp32', torch.bfloat16: 'bf16'}[resolve_precision('auto', device='cpu')[0]]  # what this CPU has
    params = dict(model='micro-typhoon', precision=cpu, quantization='none', seeds=2, curve_points=2, workers=2,
                  max_steps={'pretrain': 2, 'sft': 4, 'dpo': 1}, eval_samples=8, out_json=str(out))
    env = {'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        pm.execute_notebook(str(NB), str(folder / 'demo_seeds.ipynb'), cwd=str(folder), kernel_name='python3',
                            parameters=params, progress_bar=False)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return json.loads(out.read_text()), params

def test_every_seed_ran_the_three_stages_with_per_task_numbers(smoke):
    res, p = smoke
    from typhoon_nb.config import RunConfig
    from typhoon_nb.curriculum import DEMO_TASKS
    s0 = RunConfig().seed
    assert res['seeds'] == [s0, s0 + 1] and [r['seed'] for r in res['runs']] == res['seeds']
    for r in res['runs']:
        assert r['status'] == 'done' and r['wall_s'] > 0
        st = r['stages']
        assert [st[k]['steps'] for k in ('pretrain', 'sft', 'dpo')] == [2, 4, 1]
        assert set(st['sft']['exact_match_by_task_after']) <= set(DEMO_TASKS) and st['sft']['exact_match_by_task_after']
        assert all(0 <= v <= 1 for v in st['sft']['exact_match_by_task_after'].values())
        assert math.isfinite(st['pretrain']['perplexity_after']) and 0 <= st['dpo']['preference_accuracy_after'] <= 1
        assert {'pretrain', 'sft', 'dpo'} <= set(r['samples']) and all('before' in x and 'after' in x for x in r['samples']['sft'])
        assert any(w.startswith('sft: exact match on to_words') for w, _, _ in r['checks'])

def test_spread_is_over_the_seeds(smoke):
    res, _ = smoke
    sp = res['spread']['sft: exact match']
    vals = [r['stages']['sft']['exact_match_after'] for r in res['runs']]
    assert sp['values'] == vals and sp['min'] == min(vals) and sp['max'] == max(vals)
    assert abs(sp['mean'] - sum(vals) / len(vals)) < 1e-12 and sp['met'] == (min(vals) >= 0.5)

def test_curve_and_machine_record(smoke):
    res, p = smoke
    c = res['curve']
    assert c["steps"] == [0, 2, 4] and c["segments"] == 2 and len(c['exact_match']) == 3 and all(0 <= v <= 1 for v in c['exact_match'])
    assert res['curve']['exact_match'][0] == res['runs'][0]['stages']['sft']['exact_match_before']  # same base, same seed
    m = res['machine']
    assert m['cores'] == os.cpu_count() and m['precision'] == {'fp32': 'float32', 'bf16': 'bfloat16'}[p['precision']] and 'cpu' in m and 'load_average_start' in m
