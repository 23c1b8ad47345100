"""The panels headless: widget values in, RunConfig out; validator messages next to their fields; Run on the micro
model with Stop and Resume; comparing run folders, including broken ones."""
import html, json, re, shlex, time
from dataclasses import fields, replace
from pathlib import Path

import pytest

from typhoon_nb.config import RunConfig, StageConfig, ConfigError, make_parser
from typhoon_nb.panels import TechniquePanel, RunPanel, ComparePanel, job_commands, read_run, SHOW_WHEN


def text(w) -> str:
    "What an HTML widget reads as."
    return html.unescape(re.sub('<[^>]+>', '', w.value))


def shown(cell) -> bool: return cell.layout.display != 'none'


# --- TechniquePanel ------------------------------------------------------------------------------------------------

EVERY_FIELD = RunConfig(
    model='micro-typhoon', precision='fp32', trust_remote_code=True, allow_pickle=True, quantization='8bit',
    peft_method='both', lora_r=4, lora_alpha=8.0, lora_dropout=0.2, lora_targets=['q_proj', 'v_proj'], use_rslora=True,
    use_dora=True, prefix_tokens=5, prefix_projection=True, gradient_checkpointing=False, use_rwkv=True, rwkv_window=16,
    rwkv_transfer_steps=7, use_moe=True, moe_experts=4, moe_top_k=1, moe_aux_coef=0.02, moe_z_coef=0.001, use_gqa=True,
    gqa_kv_heads=2, use_llama3=True, lr_schedule='linear', warmup_ratio=0.1, embedding_lr=1e-5, neftune_alpha=5.0,
    label_smoothing=0.1, weight_decay=0.01, max_grad_norm=0.5, completion_only=False, packing=False, seed=7,
    output_dir='elsewhere', run_name='every-field', resume=None, overwrite=True, logging='tensorboard', num_processes=2,
    stages=[StageConfig(kind='pretrain', data='corpus.jsonl', name='cpt', eval_data='held.jsonl', lr=3e-4, epochs=2.0,
                        max_steps=9, batch_size=2, grad_accum=3, max_length=77, train_embeddings=True,
                        columns={'body': 'text'}, on_bad_record='skip', save_steps=3, eval_samples=5,
                        overrides={'neftune_alpha': 10.0}),
            StageConfig(kind='dpo', data='demo:dpo', beta=0.3, reference='entering')])


def test_every_field_differs_from_default_and_round_trips():
    "Loading a config where every field differs from its default gives it back unchanged through the widgets."
    base = RunConfig()
    same = [f.name for f in fields(RunConfig) if f.name != 'resume' and getattr(EVERY_FIELD, f.name) == getattr(base, f.name)]
    assert same == []   # gradient_checkpointing: False differs from the default auto (on would contradict prefix tuning)
    tp = TechniquePanel(EVERY_FIELD)
    assert tp.problems == [] and tp.run_button.disabled is False
    assert tp.config == EVERY_FIELD
    assert set(tp.w) == {f.name for f in fields(RunConfig)} - {'stages'}


def test_values_set_clicks_and_observers():
    "Setting .value fires the observers (validation, visibility); clicks add, move and remove stages."
    tp = TechniquePanel()
    tp.w['quantization'].value = 'none'
    tp.w['peft_method'].value = 'prefix'
    assert not shown(tp.cells['lora_r']) and shown(tp.cells['prefix_tokens'])
    tp.w['prefix_tokens'].value = 12
    tp.w['use_rwkv'].value = True
    assert shown(tp.cells['rwkv_window'])
    tp.w['rwkv_window'].value = 32
    tp.w['embedding_lr'].value = ''            # empty text is None
    tp.w['lora_targets'].value = 'q_proj, k_proj'
    tp.add_kind.value = 'dpo'
    tp.add_button.click()                      # a second DPO stage: the name clash is reported on the stages tab
    assert "stages: two stages are named 'dpo'; give them distinct `name`s" in text(tp.stages_msg)
    assert tp.run_button.disabled and tp.tabs.get_title(4) == 'Stages (1)'
    tp.stage_boxes[3].w['name'].value = 'dpo2'
    tp.stage_boxes[3].w['beta'].value = 0.5
    assert not tp.run_button.disabled and tp.tabs.get_title(4) == 'Stages'
    tp.stage_boxes[0].buttons['down'].click()  # pretrain after sft
    cfg = tp.config
    assert [s.stage_name for s in cfg.stages] == ['sft', 'pretrain', 'dpo', 'dpo2']
    assert (cfg.quantization, cfg.peft_method, cfg.prefix_tokens, cfg.use_rwkv, cfg.rwkv_window) == ('none', 'prefix', 12, True, 32)
    assert cfg.lora_targets == ['q_proj', 'k_proj'] and cfg.embedding_lr is None
    assert (cfg.stages[3].beta, cfg.stages[3].data) == (0.5, 'demo:dpo')
    tp.stage_boxes[1].buttons['remove'].click()
    assert [s.kind for s in tp.config.stages] == ['sft', 'dpo', 'dpo']
    # dependent stage fields follow the kind
    b = tp.stage_boxes[0]
    assert not shown(b.cells['beta'])
    b.w['kind'].value = 'pretrain'
    assert shown(b.cells['train_embeddings']) and not shown(b.cells['beta'])


# (field or (stage, field), value, the validator's message, the tab title that counts it)
BAD = [
    ('lora_r', 0, 'lora_r: must be > 0 (typical: 8, 16, 64), got 0', 'PEFT (1)'),
    ('lora_dropout', 1.0, 'lora_dropout: must be in [0, 1), got 1.0', 'PEFT (1)'),
    ('lora_targets', ' , ', "lora_targets: must be a non-empty list of module names or ['all-linear'], got []", 'PEFT (1)'),
    ('prefix_tokens', -3, 'prefix_tokens: must be > 0 (typical: 10-30), got -3', 'PEFT (1)'),
    ('gqa_kv_heads', 0, 'gqa_kv_heads: must be >= 1, got 0', 'Patches (1)'),
    ('moe_top_k', 0, 'moe_top_k: must be >= 1, got 0', 'Patches (1)'),
    ('neftune_alpha', 'abc', "neftune_alpha: expected optional float, got str 'abc'", 'Refinements (1)'),
    ('neftune_alpha', '-5', 'neftune_alpha: must be > 0 or None (off); the paper uses 5, 10 or 15, got -5.0', 'Refinements (1)'),
    ('warmup_ratio', 1.5, 'warmup_ratio: must be in [0, 1), got 1.5', 'Refinements (1)'),
    ('run_name', 'a/b', "run_name: must be a plain folder name (no path separators, not starting with '-' or '.'), got 'a/b'", 'Run (1)'),
    ('num_processes', 0, 'num_processes: must be >= 1, got 0', 'Run (1)'),
    ('model', '  ', 'model: must name a hub id, a local folder or tiny-typhoon', 'Model (1)'),
    ((1, 'lr'), -1.0, 'stages[1].lr: must be > 0, got -1.0', 'Stages (1)'),
    ((2, 'beta'), 0.0, 'stages[2].beta: must be > 0, got 0.0', 'Stages (1)'),
    ((0, 'max_steps'), 0, 'stages[0].max_steps: must be -1 (use epochs) or > 0, got 0', 'Stages (1)'),
    ((0, 'data'), '', 'stages[0].data: every stage needs data (a file, folder, hub id, or demo:pretrain)', 'Stages (1)'),
]


@pytest.mark.parametrize('target,value,message,tab', BAD, ids=[m.split(':')[0] + f'={v!r}' for _, v, m, _ in BAD])
def test_invalid_value_shows_message_and_disables_run(target, value, message, tab):
    "Each bad value: the validator's message next to the field, the tab counts it, Run disabled, .config raises."
    tp = TechniquePanel()
    rp = RunPanel(tp)
    assert not tp.run_button.disabled and not rp.run_button.disabled
    if isinstance(target, tuple): w, msg, cell = (tp.stage_boxes[target[0]].w[target[1]], tp.stage_boxes[target[0]].msg[target[1]],
                                                  tp.stage_boxes[target[0]].cells[target[1]])
    else: w, msg, cell = tp.w[target], tp.msg[target], tp.cells[target]
    good = w.value
    w.value = value
    assert tp.problems == [message]
    assert text(msg) == f'\u26a0 {message}'
    assert shown(cell)                          # shown even where the field would be hidden
    assert tab in [tp.tabs.get_title(i) for i in range(len(tp.tabs.children))]
    assert tp.run_button.disabled and rp.run_button.disabled
    assert '1 problem: Run is disabled' in text(tp.summary)
    with pytest.raises(ConfigError, match=re.escape(message)): tp.config
    w.value = good
    assert tp.problems == [] and msg.value == '' and not tp.run_button.disabled and not rp.run_button.disabled


def test_contradictions_are_shown_on_their_field():
    tp = TechniquePanel()
    tp.w['peft_method'].value = 'full'          # with the default 4-bit quantization
    assert text(tp.msg['peft_method']).startswith('\u26a0 peft_method: full training needs a full-precision base, but quantization is 4bit')
    tp.w['quantization'].value = 'none'
    assert tp.problems == []
    tp.w['peft_method'].value = 'prefix'
    tp.w['gradient_checkpointing'].value = True
    assert tp.problems == ['gradient_checkpointing: PEFT cannot combine prefix tuning with gradient checkpointing (turn one off)']
    assert tp.run_button.disabled


def test_load_yaml_and_save_button(tmp_path):
    tp = TechniquePanel()
    tp.load(EVERY_FIELD.to_yaml())              # YAML text
    assert tp.config == EVERY_FIELD
    tp.yaml_path.value = str(tmp_path / 'saved.yaml')
    tp.save_button.click()
    assert RunConfig.from_yaml(tmp_path / 'saved.yaml') == EVERY_FIELD
    assert 'saved' in text(tp.status)
    tp2 = TechniquePanel(str(tmp_path / 'saved.yaml'))   # a YAML path
    assert tp2.config == EVERY_FIELD
    (tmp_path / 'bad.yaml').write_text('lora_r: [1\n')
    before = tp2.raw
    with pytest.raises(ConfigError, match='bad.yaml: not valid YAML at line'):
        tp2.load(str(tmp_path / 'bad.yaml'))
    assert tp2.raw == before                    # a failed load changes nothing
    tp2.w['lora_r'].value = -1
    tp2.yaml_path.value = str(tmp_path / 'invalid.yaml')
    tp2.save_button.click()                     # the click reports, it does not raise
    assert 'not saved: 1 problem(s)' in text(tp2.status) and not (tmp_path / 'invalid.yaml').exists()
    with pytest.raises(ConfigError, match='lora_r: must be > 0'): tp2.save_yaml()


def test_commands_reproduce_the_config():
    "The shown `typhoon-nb train` flags and papermill parameters rebuild exactly the panel's config."
    from papermill.cli import _resolve_type
    from typhoon_nb.jobs import job_config
    cfg = replace(EVERY_FIELD, resume='runs/old', run_name='x y')    # a space must survive the shell
    tp = TechniquePanel(cfg)
    tp.commands_button.click()
    cli, pm = tp.commands_area.value.split('\n\n')
    assert (cli, pm) == tuple(job_commands(cfg).values())
    argv = shlex.split(cli)
    assert argv[:2] == ['typhoon-nb', 'train']
    make_parser().parse_args(argv[2:])          # the command line accepts every flag
    assert RunConfig.from_flags(argv[2:]) == cfg
    a = shlex.split(pm)
    assert a[:3] == ['papermill', 'nbs/jobs/train.ipynb', 'out.ipynb']
    params = {a[i + 1]: _resolve_type(a[i + 2]) for i in range(3, len(a), 3)}
    assert all(a[i] == '-p' for i in range(3, len(a), 3))
    assert job_config(params) == cfg


# --- RunPanel on the micro model -------------------------------------------------------------------------------

MICRO = dict(model='micro-typhoon', quantization='none', lora_r=4, lora_alpha=8.0)
MAX_STEPS = 5


@pytest.fixture(scope='module')
def stopped_and_resumed(tmp_path_factory):
    "One real run through the panels: Run, Stop after the first logged loss, Resume to the end."
    out = tmp_path_factory.mktemp('runs')
    cfg = RunConfig(**MICRO, output_dir=str(out), run_name='stop-resume',
                    stages=[StageConfig(kind='sft', data='demo:sft', max_steps=MAX_STEPS, batch_size=4, max_length=64,
                                        save_steps=0, eval_samples=4, lr=1e-3)])
    tp = TechniquePanel(cfg)
    rp = RunPanel(tp)
    seen = {}
    listener = rp.on_log

    def stop_on_first_loss(rec):     # Stop is clicked from the listener, so the stop step is deterministic
        listener(rec)
        if 'loss' in rec and 'stop_step' not in seen:
            seen['stop_step'] = rec['step']
            rp.stop_button.click()
    rp.on_log = stop_on_first_loss
    t0 = time.time()
    tp.run_button.click()
    seen['start_s'] = time.time() - t0
    seen['alive_after_start'] = rp.thread.is_alive()
    seen['running_state'] = rp.state
    rp.wait(300)
    seen['stopped'] = dict(state=rp.state, bar=rp.bars['sft'].value, style=rp.bars['sft'].bar_style, chat=rp.chat_button.disabled,
                           resume=rp.resume_button.disabled, run=rp.run_button.disabled, points=list(rp.loss_points),
                           manifest=json.loads((rp.run_dir / 'manifest.json').read_text()),
                           checkpoints=sorted(p.name for p in (rp.run_dir / 'stages' / '0-sft' / 'checkpoints').glob('checkpoint-*')),
                           png=rp.plot.value)
    rp.on_log = listener
    rp.resume_button.click()
    rp.wait(300)
    return rp, seen


def test_run_returns_at_once_and_trains_in_the_background(stopped_and_resumed):
    rp, seen = stopped_and_resumed
    assert seen['alive_after_start'] and seen['running_state'] == 'running'
    assert seen['start_s'] < 2.0, seen['start_s']


def test_stop_saves_a_checkpoint_and_marks_the_stage_stopped(stopped_and_resumed):
    rp, seen = stopped_and_resumed
    s = seen['stopped']
    stop = seen['stop_step']                              # the first step that logged a loss
    assert (s['state'], s['style'], s['resume'], s['run']) == ('stopped', 'warning', False, False)
    assert s['bar'] == round(100 * (stop + 1) / MAX_STEPS) and 0 < s['bar'] < 100
    assert s['manifest']['status'] == 'stopped' and s['manifest']['stages']['sft']['status'] == 'stopped'
    assert s['checkpoints'] == [f'checkpoint-{stop + 1}']  # the step after the click finished and was saved
    assert all(p[1] <= stop + 1 for p in s['points']) and s['points'][0][1] == stop
    assert s['png'][:8] == b'\x89PNG\r\n\x1a\n'


def test_resume_finishes_with_full_bar_loss_points_and_evaluation(stopped_and_resumed):
    from typhoon_nb.stages import read_metrics
    rp, seen = stopped_and_resumed
    assert rp.error is None and rp.state == 'done' and rp.result.status == 'done'
    assert (rp.bars['sft'].value, rp.bars['sft'].bar_style) == (100, 'success')
    losses = [r for r in read_metrics(rp.run_dir) if 'loss' in r]
    steps = [r['step'] for r in losses]
    assert [p[1] for p in rp.loss_points] == steps and steps == sorted(set(steps)) and steps[-1] == MAX_STEPS
    assert len(steps) > len(seen['stopped']['points'])   # the resumed steps were added to the curve
    assert [p[2] for p in rp.loss_points] == [r['loss'] for r in losses]
    assert rp.plot.value != seen['stopped']['png']        # redrawn with the resumed points
    assert 'exact_match' in text(rp.evals) and 'style_rate' in text(rp.evals)
    assert rp.result.stages[0].steps == MAX_STEPS
    assert 'run done' in rp.log_area.value and 'run stopped' in rp.log_area.value
    assert rp.resume_button.disabled and rp.stop_button.disabled


def test_chat_opens_on_the_finished_run(stopped_and_resumed):
    "Chat stays off while no stage has finished (stopped mid-SFT), turns on when the run is done and opens a ChatPanel on it."
    rp, seen = stopped_and_resumed
    assert seen['stopped']['chat'] is True and rp.chat_button.disabled is False
    rp.chat_button.click()
    assert rp.chat is not None and rp.chat_box.children == (rp.chat,)
    assert rp.chat.folder.value == str(rp.run_dir) and rp.chat.stage_select.value == ('base', 'final')
    rp.chat.max_new.value = 8
    rp.chat.send('สวัสดี', wait=True)
    assert rp.chat.error is None and [m['role'] for m in rp.chat.histories['final']] == ['user', 'assistant']


def test_start_while_running_and_resume_without_a_run_are_refused(tmp_path):
    rp = RunPanel(RunConfig(**MICRO, output_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match=r'nothing to resume \(state: idle\)'): rp.resume()
    assert RunPanel().run_button.disabled
    with pytest.raises(ValueError, match='RunPanel has no config'): RunPanel().start()


def test_failed_run_shows_the_error(tmp_path):
    "A run that cannot start (its data file is missing) ends as failed, with the error in the log."
    rp = RunPanel(RunConfig(**MICRO, output_dir=str(tmp_path), run_name='bad',
                            stages=[StageConfig(kind='sft', data=str(tmp_path / 'missing.jsonl'), max_steps=2)]))
    rp.start()
    with pytest.raises(Exception) as ei: rp.wait(300)
    assert rp.state == 'failed' and rp.error is ei.value
    assert 'missing.jsonl' in rp.log_area.value and 'run failed' in rp.log_area.value
    assert not rp.run_button.disabled


# --- ComparePanel ----------------------------------------------------------------------------------------------

def write_run(root, name, lora_r, losses, em):
    "A run folder in the layout run(cfg) writes."
    rd = Path(root) / name; rd.mkdir(parents=True)
    RunConfig(lora_r=lora_r, run_name=name, stages=[StageConfig(kind='sft', data='demo:sft', max_steps=len(losses))]).to_yaml(rd / 'config.yaml')
    (rd / 'summary.json').write_text(json.dumps({'status': 'done', 'wall_s': 3.0, 'stages': {'sft': {
        'kind': 'sft', 'status': 'done', 'steps': len(losses), 'exact_match_before': 0.0, 'exact_match_after': em}}}))
    (rd / 'metrics.jsonl').write_text(''.join(json.dumps({'stage': 'sft', 'step': 5 * (i + 1), 'loss': l}) + '\n'
                                              for i, l in enumerate(losses)))
    return rd


def test_compare_real_and_written_runs(stopped_and_resumed, tmp_path):
    rp, _ = stopped_and_resumed
    other = write_run(tmp_path, 'r16', 16, [3.0, 2.0], 0.5)
    cp = ComparePanel(rp.run_dir.parent)
    assert [v for _, v in cp.picker.options] == [str(rp.run_dir)]
    assert cp.picker.value == (str(rp.run_dir),)         # the newest runs are selected at start
    cp.add_path.value = str(other)
    cp.add_button.click()
    assert [r['name'] for r in cp.runs] == ['stop-resume', 'r16']
    head = [html.unescape(h) for h in re.findall(r'<th[^>]*>(.*?)</th>', cp.table.value)]
    assert head[:2] == ['run', 'status'] and 'sft.exact_match_after' in head and 'sft.loss' in head
    real_last = [r['loss'] for r in read_run(rp.run_dir)['records']][-1]
    assert f'{real_last:.3f}' in text(cp.table)
    assert len(cp.points) == len(read_run(rp.run_dir)['records']) + 2
    diff = text(cp.diff)
    for field in ('lora_r', 'model', 'quantization', 'stages[0].max_steps', 'stages[0].lr'): assert field in diff


def test_compare_bad_folders(tmp_path):
    good = write_run(tmp_path, 'good', 8, [2.0, 1.0], 0.25)
    bad = write_run(tmp_path, 'bad', 8, [2.0], 0.25)
    with open(bad / 'metrics.jsonl', 'a') as f: f.write('{"stage": "sft", "step": 10, "loss": \n')
    cp = ComparePanel(tmp_path, select=[good, bad])
    assert [r['name'] for r in cp.runs] == ['good']
    assert f"{bad / 'metrics.jsonl'}: line 2 is not JSON" in text(cp.message)
    cp.add(tmp_path / 'nowhere')
    assert f"{tmp_path / 'nowhere'}: not a run folder (no config.yaml)" in text(cp.message)
    empty = ComparePanel(tmp_path / 'none')
    assert empty.picker.options == () and 'no run folders in' in text(empty.message)
