"The refinements A/B notebook, executed by papermill with its smoke parameters (micro model, two variants, one seed, two steps): the record it writes."
import dataclasses, json, math, os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB = ROOT / 'nbs' / 'benchmarks' / 'refinements_ab.ipynb'
SMOKE = dict(model='micro-typhoon', seeds=1, max_steps=2, eval_samples=4, variants=['neftune_alpha', 'packing'])

def execute(folder, **params):
    "Run the notebook with `params` in `folder`; return its JSON record and the executed notebook."
    import papermill as pm
    out = folder / 'refinements_ab.json'
    env = {'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nb = pm.execute_notebook(str(NB), str(folder / 'refinements_ab.ipynb'), cwd=str(folder), kernel_name='python3',
                                 parameters=params | {'out_json': str(out)}, progress_bar=False)
    finally:
        for k, v in old.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v
    return json.loads(out.read_text()), nb

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    return execute(tmp_path_factory.mktemp('refinements_ab'), **SMOKE)

def test_every_arm_and_seed_has_finite_metrics(smoke):
    res, _ = smoke
    from typhoon_nb.config import RunConfig
    assert res['seeds'] == [RunConfig().seed]
    arms = {(r['arm'], r['seed']) for r in res['runs']}
    assert arms == {(a, s) for a in ('baseline', 'neftune_alpha', 'packing') for s in res['seeds']}
    assert len(res['runs']) == 3
    for r in res['runs']:
        assert r['status'] == 'done' and r['steps'] == 2 and r['tokens'] > 0
        for k in ('exact_match_after', 'completion_loss_after', 'wall_s', 'train_s'):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (r['arm'], k, r[k])
        assert 0 <= r['exact_match_after'] <= 1
        assert 0 < r['completion_loss_after'] < r['completion_loss_before'] + 1  # nats per completion token, from the held-out split
        assert r['wall_s'] > r['train_s'] > 0

def test_each_variant_flips_exactly_one_field_of_the_defaults(smoke):
    res, _ = smoke
    from typhoon_nb.config import RunConfig, REFINEMENT_FIELDS
    d = RunConfig()
    sft = next(s for s in d.stages if s.kind == 'sft')  # the demo's SFT stage; its own overrides are the baseline's settings
    base = {f: sft.overrides.get(f, getattr(d, f)) for f in REFINEMENT_FIELDS}
    assert res['baseline'] == base
    assert res['variants'] == {'neftune_alpha': 5.0, 'packing': False}  # the defaults are None and True
    for r in res['runs']:
        changed = {f: v for f, v in r['config'].items() if v != base[f]}  # read back from the run folder's config.yaml
        assert changed == ({} if r['arm'] == 'baseline' else {r['arm']: res['variants'][r['arm']]})
    assert res['stage'] == dataclasses.asdict(dataclasses.replace(sft, overrides={}, max_steps=2, eval_samples=4, save_steps=0))

def test_packing_off_trains_fewer_tokens_in_the_same_steps(smoke):
    res, _ = smoke
    by = {r['arm']: r for r in res['runs']}
    assert by['packing']['steps'] == by['baseline']['steps'] == 2
    assert by['packing']['tokens'] < by['baseline']['tokens']  # one record per sequence instead of full 96-token blocks
    assert by['neftune_alpha']['tokens'] == by['baseline']['tokens']  # same seed, same data order

def test_summary_deltas_are_the_paired_differences(smoke):
    res, _ = smoke
    by = {r['arm']: r for r in res['runs']}
    for arm in ('neftune_alpha', 'packing'):
        s = res['summary'][arm]
        for k in ('exact_match_after', 'completion_loss_after', 'wall_s'):
            assert s[f'delta_{k}']['mean'] == pytest.approx(by[arm][k] - by['baseline'][k])
            assert s[k]['std'] == 0.0 and s[k]['min'] == s[k]['max'] == by[arm][k]  # one seed
        assert res['verdicts'][arm]['completion_loss'] == 'not judged (one seed)'

def test_page_shows_table_plot_and_conclusions(smoke):
    _, nb = smoke
    outs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    md = [o['data']['text/markdown'] for o in outs if 'text/markdown' in o.get('data', {})]
    assert len(md) == 1 and md[0].count('\n| ') == 3  # header row, then baseline and two variants
    assert sum('image/png' in o.get('data', {}) for o in outs) == 1
    text = ''.join(o.get('text', '') for o in outs)
    assert 'NEFTune alpha 5 (vs off): held-out completion loss' in text and 'packing (vs one record per sequence)' in text
    assert not any(o.get('output_type') == 'error' for o in outs)

def test_unknown_variant_is_refused(tmp_path):
    import papermill as pm
    with pytest.raises(pm.PapermillExecutionError, match=r"variants: unknown refinement field\(s\) \['neftune'\]; choose from lr_schedule"):
        execute(tmp_path, **(SMOKE | {'variants': ['neftune']}))
