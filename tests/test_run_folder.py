"The run folder: checkpoint retention (keep_checkpoints), resume from a finished stage's adapter, and the before/after chart."
import json, math, os
from pathlib import Path
import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
from typhoon_nb.config import RunConfig, StageConfig, ConfigError

KEEP = 2
STAGES = [dict(kind='pretrain', data='demo:pretrain', lr=5e-3, max_steps=4, batch_size=4, max_length=64, save_steps=1,
               keep_checkpoints=KEEP, eval_samples=8, train_embeddings=True),
          dict(kind='sft', data='demo:sft', lr=5e-3, max_steps=5, batch_size=8, max_length=64, save_steps=1,
               keep_checkpoints=KEEP, eval_samples=8),
          dict(kind='dpo', data='demo:dpo', lr=1e-3, max_steps=3, batch_size=4, max_length=64, save_steps=1,
               keep_checkpoints=KEEP, eval_samples=8)]

def micro(out, name, **kw) -> RunConfig:
    return RunConfig.from_dict(dict(model='micro-typhoon', quantization='none', precision='fp32', output_dir=str(out), run_name=name,
                                    lora_r=8, lora_alpha=16.0, lora_dropout=0.0, warmup_ratio=0.0, stages=STAGES) | kw)

def complete_checkpoints(rd) -> dict:
    "Stage folder -> the names of its complete checkpoints now."
    from typhoon_nb.stages import verify_checkpoint
    return {sd.name: sorted(p.name for p in (sd / 'checkpoints').glob('checkpoint-*') if verify_checkpoint(p) is None)
            for sd in sorted((Path(rd) / 'stages').glob('*'))}

@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
    "An uninterrupted three-stage run that saves every step, watched at every logged step."
    from typhoon_nb.stages import run
    out = tmp_path_factory.mktemp('runs')
    seen = []
    def listener(rec):
        seen.append((rec['stage'], rec.get('step'), complete_checkpoints(out / 'full')))
    res = run(micro(out, 'full'), progress=False, verbose=False, listener=listener)
    assert res.status == 'done'
    return res, seen

def test_keep_checkpoints_is_a_validated_stage_field():
    assert StageConfig().keep_checkpoints == 2
    with pytest.raises(ConfigError, match=r'stages\[0\]\.keep_checkpoints: must be >= 1 \(a resume starts from the newest complete checkpoint\), got 0'):
        RunConfig.from_dict({'stages': [{'kind': 'sft', 'data': 'demo:sft', 'keep_checkpoints': 0}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.keep_checkpoints: expected int, got str 'two'"):
        RunConfig.from_flat({'stages': "[{kind: sft, data: 'demo:sft', keep_checkpoints: two}]"})
    from typhoon_nb.config import field_help
    assert 'kept while the stage runs' in field_help(StageConfig)['keep_checkpoints']

def test_keep_checkpoints_is_in_the_panel():
    "The stage box shows the field and round-trips it."
    from typhoon_nb.panels import TechniquePanel
    cfg = RunConfig(stages=[StageConfig(kind='sft', data='demo:sft', keep_checkpoints=5)])
    tp = TechniquePanel(cfg)
    assert 'keep_checkpoints' in tp.stage_boxes[0].w
    assert tp.config.stages[0].keep_checkpoints == 5

def test_a_running_stage_keeps_its_newest_checkpoints(full_run):
    res, seen = full_run
    steps = {'pretrain': 4, 'sft': 5, 'dpo': 3}
    running = {'pretrain': '0-pretrain', 'sft': '1-sft', 'dpo': '2-dpo'}
    for stage, n in steps.items():
        counts = [(step, cks.get(running[stage], [])) for s, step, cks in seen if s == stage and step is not None]
        assert counts, stage
        assert max(len(c) for _, c in counts) == KEEP, (stage, counts)  # pruned to KEEP, and it reached KEEP
        # the ones kept are the newest: at the stage's last log, the KEEP steps up to the last one saved
        step, last = counts[-1]
        ks = sorted(int(n.split('-')[1]) for n in last)
        assert ks == list(range(ks[-1] - KEEP + 1, ks[-1] + 1)) and ks[-1] in (step - 1, step) and step == n, (stage, counts[-1])
        # a finished stage has no checkpoint left while the next one runs
        for s, step, cks in seen:
            if list(steps).index(s) > list(steps).index(stage): assert cks.get(running[stage], []) == [], (s, step, cks)

def test_a_finished_stage_keeps_only_its_adapter(full_run):
    res, _ = full_run
    rd = Path(res.run_dir)
    for sd in sorted((rd / 'stages').iterdir()):
        assert sorted(p.name for p in sd.iterdir()) == ['adapter'], sd
        assert (sd / 'adapter' / 'adapter_model.safetensors').is_file()
    assert not list(rd.rglob('checkpoint-*')) and not list(rd.rglob('optimizer.pt'))
    assert (rd / 'final' / 'adapter_model.safetensors').is_file()

def test_resume_from_a_finished_stage_adapter(full_run, tmp_path):
    "A run cut off as its DPO stage starts resumes from the SFT stage's adapter (no checkpoint left) and ends where the uninterrupted run ends."
    from typhoon_nb.stages import run
    ref, _ = full_run
    class Cut(Exception): pass
    def listener(rec):
        if rec['stage'] == 'dpo': raise Cut('cut off at the first DPO log')
    with pytest.raises(Cut): run(micro(tmp_path, 'cut'), progress=False, verbose=False, listener=listener)
    rd = tmp_path / 'cut'
    man = json.loads((rd / 'manifest.json').read_text())
    assert [man['stages'][s]['status'] for s in ('pretrain', 'sft', 'dpo')] == ['done', 'done', 'failed']
    assert sorted(p.name for p in (rd / 'stages' / '1-sft').iterdir()) == ['adapter']
    # what a kill between "done" in the manifest and the removal would leave: removed on resume
    (rd / 'stages' / '1-sft' / 'checkpoints' / 'checkpoint-5').mkdir(parents=True)
    (rd / 'stages' / '1-sft' / '.old-checkpoints').mkdir()
    assert not list((rd / 'stages' / '2-dpo').rglob('checkpoint-*'))  # cut before its first save: it starts again from the SFT adapter
    res = run(RunConfig(resume=str(rd), output_dir=str(tmp_path)), progress=False, verbose=False)
    assert res.status == 'done'
    man = json.loads((rd / 'manifest.json').read_text())
    assert [{k: r[k] for k in ('stage', 'checkpoint')} for r in man['resumes']] == [{'stage': 'dpo', 'checkpoint': None}]
    assert sorted(p.name for p in (rd / 'stages' / '1-sft').iterdir()) == ['adapter']
    want = json.loads((Path(ref.run_dir) / 'summary.json').read_text())['stages']
    got = json.loads((rd / 'summary.json').read_text())['stages']
    for st, d in want.items():
        for k, v in d.items():
            if k.endswith(('_before', '_after')) and not isinstance(v, dict):
                assert got[st][k] == pytest.approx(v, abs=1e-4), (st, k)
    from safetensors.torch import load_file
    a, b = load_file(str(Path(ref.run_dir) / 'final' / 'adapter_model.safetensors')), load_file(str(rd / 'final' / 'adapter_model.safetensors'))
    assert set(a) == set(b) and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

WORDS = {'perplexity': 'perplexity', 'exact_match': 'exact match', 'style_rate': 'polite style', 'completion_loss': 'completion loss',
         'preference_accuracy': 'preference accuracy'}

def test_eval_chart_draws_before_and_after_for_every_metric(full_run):
    "The chart's data, read from the figure's bars (not the pixels), is summary.json: a before and an after bar per metric."
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from typhoon_nb.stages import eval_figure
    res, _ = full_run
    rd = Path(res.run_dir)
    assert (rd / 'plots' / 'eval.png').stat().st_size > 5000 and (rd / 'plots' / 'loss.png').is_file()
    summ = json.loads((rd / 'summary.json').read_text())
    want = {}
    for st, d in summ['stages'].items():
        for k, v in d.items():
            if k.endswith('_before'):
                m = k[:-len('_before')]
                if isinstance(v, dict):  # a metric per task
                    for t, x in v.items(): want[f"{st}: {WORDS[m.removesuffix('_by_task')]} ({t})"] = (x, d[f'{m}_after'][t])
                else: want[f'{st}: {WORDS[m]}'] = (v, d[f'{m}_after'])
    assert {'pretrain: perplexity', 'sft: exact match', 'sft: polite style', 'dpo: preference accuracy'} <= set(want)
    fig = eval_figure(summ)
    drawn = {}
    for ax in fig.axes:
        before, after = ax.containers
        assert (before.get_label(), after.get_label()) == ('before', 'after')
        labels = [t.get_text().replace('\n', ' ') for t in ax.get_xticklabels()]
        for lab, pb, pa in zip(labels, before, after): drawn[lab] = (pb.get_height(), pa.get_height())
        assert not any(lab.endswith('_') for lab in labels), labels
    plt.close(fig)
    assert set(drawn) == set(want)
    for lab, (b, a) in want.items():
        assert drawn[lab] == (pytest.approx(b), pytest.approx(a)), lab
        assert not math.isnan(drawn[lab][1]), lab  # the after bar is there
