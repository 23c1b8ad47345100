"Jobs end to end: the job notebook through papermill, the typhoon-nb command as a subprocess, determinism, kill and resume, 2 processes."
import csv, json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest, yaml
from typhoon_nb.config import RunConfig, ConfigError
from typhoon_nb.jobs import job_config, job_notebook

ROOT = Path(__file__).resolve().parent.parent
JOB_NB = ROOT / 'nbs' / 'jobs' / 'train.ipynb'
_script = Path(sys.executable).parent / 'typhoon-nb'
CLI = [str(_script)] if _script.exists() else [sys.executable, '-m', 'typhoon_nb.jobs']
ENV = os.environ | {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'PYTHONHASHSEED': '0'}

SFT = dict(kind='sft', data='demo:sft', lr=5e-3, max_steps=4, batch_size=8, max_length=64, save_steps=0, eval_samples=8)
BASE = dict(model='micro-typhoon', quantization='none', precision='fp32', lora_r=8, lora_alpha=16.0, warmup_ratio=0.0,
            prefix_tokens=4, stages=[SFT])

def cli(*args, cwd=None, timeout=300, **kw):
    return subprocess.run(CLI + [str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)

def write_yaml(path, obj):
    Path(path).write_text(yaml.safe_dump(obj, allow_unicode=True, sort_keys=False), encoding='utf-8'); return path

_CLOCK = ('time', 'train_runtime', 'train_samples_per_second', 'train_steps_per_second', 'tokens_per_s', 'train_tokens_per_second')

def losses(run_dir):
    "(stage, step, loss) of every logged record with a loss (per-step `loss` or the end-of-stage `train_loss`)."
    recs = map(json.loads, (Path(run_dir) / 'metrics.jsonl').read_text().splitlines())
    return [(r['stage'], r['step'], r.get('loss', r.get('train_loss'))) for r in recs if 'loss' in r or 'train_loss' in r]

def logged_numbers(run_dir):
    "Every metrics.jsonl record without the wall-clock fields."
    return [{k: v for k, v in json.loads(l).items() if k not in _CLOCK} for l in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines()]

# --- the job notebook never drifts from RunConfig ---------------------------------------------------------------
def test_committed_job_notebook_is_generated():
    assert json.loads(JOB_NB.read_text(encoding='utf-8')) == job_notebook()

def test_help_notebook_lists_every_field_with_type_and_help():
    r = subprocess.run([sys.executable, '-m', 'papermill', str(JOB_NB), '--help-notebook'], env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count(' (default ') == len(RunConfig.__dataclass_fields__) == 43
    assert "lr_schedule: str (default 'cosine')" in out and 'cosine | linear | constant (after linear warmup)' in out
    assert 'neftune_alpha: Optional[float] (default None)' in out
    assert "stages: Union[str, list] (default 'demo')" in out

# --- every command's --help works and names its arguments --------------------------------------------------------
_FIELDS = [f'--{f}' for f in RunConfig.__dataclass_fields__]
HELP_NAMES = {'train': ['--config', '--peft_method', '--quantization', '--use_rwkv', '--use_llama3', *_FIELDS, '(Alpaca: 3%)'],
              'params': [f[2:] for f in _FIELDS], 'sweep': ['grid', '--log'], 'runs': ['folder'], 'compare': ['runs'],
              'resume': ['run'], 'rerun': ['run'], 'demo': ['--output_dir', '--run_name'], 'worker': ['run']}

def test_top_level_help_lists_the_commands():
    for flag in ('--help', '-h'):
        r = cli(flag, timeout=60)
        assert r.returncode == 0 and r.stderr == '', r.stderr
        listed = re.findall(r'^typhoon-nb (\w+)', r.stdout, re.M)
        assert set(HELP_NAMES) - {'worker'} <= set(listed), listed
    assert cli(timeout=60).returncode == 2     # no command: the same text, and a usage error

@pytest.mark.parametrize('cmd', list(HELP_NAMES))
def test_command_help(cmd):
    r = cli(cmd, '--help', timeout=60)
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr
    missing = [a for a in HELP_NAMES[cmd] if a not in r.stdout]
    assert not missing, (missing, r.stdout)
    if cmd != 'params': assert r.stdout.startswith(f'usage: typhoon-nb {cmd} '), r.stdout[:200]

def test_every_listed_command_has_help():
    "Each command `typhoon-nb --help` lists (commands added later included) answers --help with its usage."
    for cmd in re.findall(r'^typhoon-nb (\w+)', cli('--help', timeout=60).stdout, re.M):
        r = cli(cmd, '-h', timeout=60)
        assert r.returncode == 0 and 'Traceback' not in r.stderr, (cmd, r.stderr)
        assert r.stdout.startswith(f'usage: typhoon-nb {cmd}') or cmd == 'params', (cmd, r.stdout[:200])

# --- strings from papermill -p are parsed, never evaluated --------------------------------------------------------
@pytest.mark.parametrize('value,expected', [('true', True), ('True', True), ('yes', True), ('on', True), ('1', True),
                                            ('false', False), ('no', False), ('off', False), ('0', False), (True, True)])
def test_bool_strings(value, expected):
    assert job_config({'use_rwkv': value}).use_rwkv is expected

def test_numbers_lists_and_none_from_strings():
    c = job_config({'lora_r': '8', 'lora_alpha': '16', 'lr_schedule': 'constant', 'neftune_alpha': 'None', 'embedding_lr': '1e-4',
                    'lora_targets': 'q_proj,v_proj', 'seed': '7.0'})
    assert (c.lora_r, c.lora_alpha, c.neftune_alpha, c.embedding_lr, c.lora_targets, c.seed) == (8, 16.0, None, 1e-4, ['q_proj', 'v_proj'], 7)
    assert job_config({'lora_targets': '["q_proj", "k_proj"]'}).lora_targets == ['q_proj', 'k_proj']
    st = job_config({'stages': '- {kind: sft, data: "demo:sft", max_steps: "5", lr: "1e-3"}'}).stages
    assert (st[0].max_steps, st[0].lr) == (5, 1e-3)

def test_strings_are_never_evaluated(tmp_path):
    marker = tmp_path / 'pwned'
    with pytest.raises(ConfigError, match=r'stages: expected a list of stages, got str'):
        job_config({'stages': f"!!python/object/apply:os.system ['touch {marker}']"})
    with pytest.raises(ConfigError, match=r"lora_r: expected int, got str \"__import__\('os'\)"):
        job_config({'lora_r': "__import__('os').system('touch " + str(marker) + "')"})
    assert not marker.exists()

# --- bad input: clear error, exit 2, nothing trained -------------------------------------------------------------------
def test_bad_input_catalogue(tmp_path):
    runs = tmp_path / 'runs'
    notmap = write_yaml(tmp_path / 'list.yaml', [{'peft_method': 'lora'}])
    missing = write_yaml(tmp_path / 'missing.yaml', BASE | {'stages': [SFT | {'data': str(tmp_path / 'nope.jsonl')}]})
    g_key = write_yaml(tmp_path / 'g1.yaml', {'base': BASE, 'grid': {'lr_shedule': ['cosine', 'constant']}})
    g_top = write_yaml(tmp_path / 'g2.yaml', {'base': BASE, 'grid': {'seed': [1, 2]}, 'grids': {}})
    g_val = write_yaml(tmp_path / 'g3.yaml', {'base': BASE, 'grid': {'lora_r': [8, 'eight']}})
    cases = [
        (['train', '--peft_metod', 'prefix'], "--peft_metod: unknown field (did you mean 'peft_method'?)"),
        (['train', '--lora_r', 'eight'], "lora_r: expected int, got str 'eight'"),
        (['train', '--quantization', '3bit'], "quantization: must be one of 4bit | 8bit | none, got '3bit'"),
        (['train', '--config', notmap], 'expected a mapping of config fields at the top level, got a list'),
        (['train', '--config', missing, '--output_dir', runs], f"stages[0].data: {tmp_path / 'nope.jsonl'}: no such file or folder"),
        (['sweep', g_key], "grid.lr_shedule: unknown field (did you mean 'lr_schedule'?)"),
        (['sweep', g_top], "unknown key(s) 'grids'"),
        (['sweep', g_val], "lora_r: expected int, got str 'eight'"),
        (['resume', tmp_path / 'norun'], 'is not a run folder'),
        (['compare', tmp_path / 'norun'], 'not a run folder'),
    ]
    for args, msg in cases:
        p = cli(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.returncode, p.stderr)
        assert msg in p.stderr, (args, p.stderr)
    assert not runs.exists() and not (tmp_path / 'runs').exists()

# --- papermill as users call it: -f params.yaml and -p strings ----------------------------------------------------
@pytest.fixture(scope='module')
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp('jobs')
    write_yaml(d / 'base.yaml', BASE)
    return d

def test_papermill_with_params_file_and_p_strings(work):
    write_yaml(work / 'params.yaml', BASE | {'output_dir': str(work / 'runs'), 'run_name': 'pm'})
    p = subprocess.run([sys.executable, '-m', 'papermill', str(JOB_NB), str(work / 'pm.ipynb'), '-f', str(work / 'params.yaml'),
                        '-p', 'peft_method', 'prefix', '-p', 'packing', 'false', '-p', 'lora_targets', 'q_proj,v_proj',
                        '-k', 'python3', '--cwd', str(work)], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = RunConfig.from_yaml(work / 'runs' / 'pm' / 'config.yaml')
    assert (cfg.peft_method, cfg.packing, cfg.lora_targets, cfg.lora_r, cfg.stages[0].max_steps) == ('prefix', False, ['q_proj', 'v_proj'], 8, 4)
    man = json.loads((work / 'runs' / 'pm' / 'manifest.json').read_text())
    assert man['status'] == 'done' and man['stages']['sft']['steps'] == 4
    nb = json.loads((work / 'pm.ipynb').read_text())
    injected = [c for c in nb['cells'] if 'injected-parameters' in c['metadata'].get('tags', [])]
    assert len(injected) == 1 and 'packing = "false"' in ''.join(injected[0]['source'])
    assert any('| stage | metric | before | after |' in ''.join(o.get('data', {}).get('text/markdown', '')) for c in nb['cells'] for o in c.get('outputs', []))

def test_papermill_unknown_parameter_stops_the_job(work):
    p = subprocess.run([sys.executable, '-m', 'papermill', str(JOB_NB), str(work / 'typo.ipynb'), '-f', str(work / 'base.yaml'),
                        '-p', 'peft_metod', 'prefix', '-p', 'output_dir', str(work / 'typo-runs'), '-k', 'python3'],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "peft_metod: unknown field (did you mean 'peft_method'?)" in p.stderr
    assert not (work / 'typo-runs').exists()

# --- the command line: train, rerun (determinism), runs, compare ---------------------------------------------------
@pytest.fixture(scope='module')
def trained(work):
    runs = work / 'runs'
    p = cli('train', '--config', work / 'base.yaml', '--lora_dropout', '0.1', '--output_dir', runs, '--run_name', 't1', cwd=work)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return runs / 't1', p

def test_train_leaves_a_report(trained):
    rd, p = trained
    assert (rd / 'report.ipynb').is_file() and (rd / 'final' / 'adapter_model.safetensors').is_file()
    assert f'run folder: {rd}' in p.stdout
    nb = json.loads((rd / 'report.ipynb').read_text())
    assert nb['metadata']['papermill']['parameters']['run_name'] == 't1'
    assert RunConfig.from_yaml(rd / 'config.yaml').lora_dropout == 0.1
    assert json.loads((rd / 'summary.json').read_text())['stages']['sft']['steps'] == 4

# the terminal's progress line per stage (execute_job's JobProgress; not a terminal here: first step, every 10 s, last step)
PROGRESS = re.compile(r'^sft +\[[#.]{20}\]  step (\d+)/4  loss (\d+\.\d{4})(?:  \(mean \d+\.\d{4}\))?  [\d,]+ tok/s(?:  (\d+:\d\d) left|  done in (\d+:\d\d))?$', re.M)
# what the user cannot act on: the kernel's notices, dependency deprecations
NOISE = re.compile(r'without encryption|FutureWarning|DeprecationWarning|KeyboardInterrupt|\[IPKernelApp\]')

def test_train_shows_progress_and_no_dependency_warnings(trained):
    rd, p = trained
    steps = [(int(m.group(1)), float(m.group(2)), m.group(4)) for m in PROGRESS.finditer(p.stdout)]
    assert steps[0][0] == 1 and steps[-1][0] == 4 and steps[-1][2], (steps, p.stdout)     # from step 1 to 4/4 ... done in m:ss
    assert [s for s, _, _ in steps] == sorted(s for s, _, _ in steps)
    logged = {(r['step'], round(r['loss'], 4)) for r in map(json.loads, (rd / 'metrics.jsonl').read_text().splitlines()) if 'loss' in r}
    assert all((s, l) in logged for s, l, _ in steps), (steps, logged)       # the numbers are the trainer's
    assert not NOISE.findall(p.stdout + p.stderr), NOISE.findall(p.stdout + p.stderr)
    report = (rd / 'report.ipynb').read_text(encoding='utf-8')
    assert 'FutureWarning' not in report and 'DeprecationWarning' not in report

def test_dependency_warnings_are_quiet_ours_stay():
    import warnings
    from typhoon_nb.jobs import quiet_dependency_warnings
    raise_in = lambda module, msg, cat: exec(f"import warnings; warnings.warn({msg!r}, {cat})", {'__name__': module})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        quiet_dependency_warnings()
        raise_in('transformers.modeling_utils', 'deprecated upstream', 'FutureWarning')
        raise_in('torch.jit._script', 'deprecated upstream', 'DeprecationWarning')
        raise_in('typhoon_nb.stages', 'ours', 'FutureWarning')
        raise_in('__main__', 'the notebook calls a deprecated name', 'DeprecationWarning')
        raise_in('transformers.trainer', 'not a deprecation', 'UserWarning')
    assert [str(w.message) for w in seen] == ['ours', 'the notebook calls a deprecated name', 'not a deprecation']

def test_rerun_gives_identical_metrics(trained, work):
    rd, _ = trained
    p = cli('rerun', rd, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    r2 = rd.parent / 't1-rerun'
    a, b = logged_numbers(rd), logged_numbers(r2)
    assert len(losses(rd)) >= 1 and a == b  # same seed, same machine: bit-identical losses, grad norms, token counts
    s1, s2 = (json.loads((r / 'summary.json').read_text())['stages']['sft'] for r in (rd, r2))
    assert {k: v for k, v in s1.items() if k != 'wall_s'} == {k: v for k, v in s2.items() if k != 'wall_s'}
    cmp = cli('compare', rd, r2, cwd=work)
    assert cmp.returncode == 0 and '**config (fields that differ)**' in cmp.stdout
    assert 'lora_dropout' not in cmp.stdout  # rerun = same config
    runs = cli('runs', rd.parent, cwd=work)
    lines = [l for l in runs.stdout.splitlines() if l.startswith('t1')]
    assert len(lines) == 2 and all(' done ' in l and 'sft.train_loss=' in l for l in lines)

def test_compare_shows_config_and_metric_differences(trained, work):
    rd, _ = trained
    from typhoon_nb.jobs import compare_runs
    other = work / 'runs' / 'pm'
    if not other.exists(): pytest.skip('needs the papermill run')
    c = compare_runs([rd, other])
    assert c['config']['peft_method'] == ['lora', 'prefix'] and c['config']['packing'] == [True, False]
    assert c['metrics']['sft.train_loss'][0] != c['metrics']['sft.train_loss'][1]

# --- sweep of two points -------------------------------------------------------------------------------------------
def test_sweep_two_points(work):
    g = write_yaml(work / 'grid.yaml', {'name': 'sched', 'base': BASE | {'output_dir': str(work / 'sweeps')},
                                        'grid': {'lr_schedule': ['cosine', 'constant']}})
    p = cli('sweep', g, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    folder = work / 'sweeps' / 'sched'
    rows = list(csv.DictReader(open(folder / 'comparison.csv', encoding='utf-8')))
    assert [r['run'] for r in rows] == ['lr_schedule_cosine', 'lr_schedule_constant']
    assert [r['lr_schedule'] for r in rows] == ['cosine', 'constant'] and all(r['status'] == 'done' for r in rows)
    assert all(float(r['sft.train_loss']) > 0 for r in rows)
    assert (folder / 'comparison.png').stat().st_size > 1000 and '| lr_schedule_cosine | cosine | done |' in (folder / 'comparison.md').read_text()
    for r in rows: assert (folder / r['run'] / 'report.ipynb').is_file()
    assert len(PROGRESS.findall(p.stdout)) >= 4, p.stdout     # each point: its first step and its last, 4 steps each
    assert not NOISE.findall(p.stdout + p.stderr), NOISE.findall(p.stdout + p.stderr)

# --- a failing job ---------------------------------------------------------------------------------------------------
def test_failing_job_exits_nonzero_and_keeps_the_report(work):
    bad = work / 'pretrain.jsonl'  # text records given to an SFT stage: wrong schema, found when the data loads
    bad.write_text('\n'.join(json.dumps({'text': f'ข้อความ {i}'}) for i in range(5)) + '\n', encoding='utf-8')
    cfgp = write_yaml(work / 'bad.yaml', BASE | {'stages': [SFT | {'data': str(bad)}]})
    p = cli('train', '--config', cfgp, '--output_dir', work / 'runs', '--run_name', 'bad', cwd=work)
    assert p.returncode == 1, p.stderr[-3000:]
    assert 'job failed in cell' in p.stderr and str(bad) in p.stderr
    rd = work / 'runs' / 'bad'
    assert (rd / 'report.ipynb').is_file() and f'report notebook: {rd / "report.ipynb"}' in p.stderr
    assert json.loads((rd / 'manifest.json').read_text())['status'] == 'failed'
    assert not (rd / 'metrics.jsonl').exists()

# --- resume after a kill --------------------------------------------------------------------------------------------
def test_resume_after_kill(work):
    cfgp = write_yaml(work / 'long.yaml', BASE | {'stages': [SFT | {'max_steps': 60, 'save_steps': 3, 'batch_size': 4}]})
    rd = work / 'runs' / 'killed'
    proc = subprocess.Popen(CLI + ['train', '--config', str(cfgp), '--output_dir', str(work / 'runs'), '--run_name', 'killed'],
                            cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.time()
        while not list((rd / 'stages').glob('*/checkpoints/checkpoint-*/COMPLETE')):
            assert proc.poll() is None and time.time() - t0 < 240, 'job ended before a checkpoint was written'
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait()
    man = json.loads((rd / 'manifest.json').read_text())
    assert man['status'] == 'running' and man['stages']['sft']['status'] == 'running'  # really cut off mid-stage
    p = cli('resume', rd, cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    man = json.loads((rd / 'manifest.json').read_text())
    assert man['status'] == 'done' and man['stages']['sft']['steps'] == 60
    assert (rd / 'report.ipynb').is_file()
    steps = [s for _, s, _ in losses(rd)]
    assert steps[-1] == 60

# --- two processes (gloo on CPU) through accelerate launch ------------------------------------------------------------
# Each rank runs the same worker as `typhoon-nb`'s launch, with one extra trainer callback that records, after every
# optimizer step, the world size and a hash of the trainable weights of that rank.
FINGERPRINT_WORKER = '''
import hashlib, json, os, sys
from transformers import TrainerCallback
import typhoon_nb.stages as st

class Fingerprint(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        h = hashlib.sha256()
        for n, p in sorted(model.named_parameters()):
            if p.requires_grad: h.update(n.encode()); h.update(p.detach().cpu().float().numpy().tobytes())
        rec = {'rank': args.process_index, 'world': args.world_size, 'step': state.global_step, 'sha': h.hexdigest()}
        with open(os.path.join(os.environ['FP_OUT'], f"rank{args.process_index}.jsonl"), 'a') as f: f.write(json.dumps(rec) + '\\n')

_build = st.build_trainer
def build_trainer(cfg, stage, model, tokenizer, train_ds, out_dir, callbacks=(), progress=True):
    return _build(cfg, stage, model, tokenizer, train_ds, out_dir, list(callbacks) + [Fingerprint()], progress)
st.build_trainer = build_trainer

from typhoon_nb.jobs import worker
worker(sys.argv[1])
'''

from typhoon_nb.jobs import JobFailed

def test_two_processes_train_in_sync_and_save_one_adapter(tmp_path, monkeypatch):
    from typhoon_nb.jobs import launch
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    script = tmp_path / 'fingerprint_worker.py'; script.write_text(FINGERPRINT_WORKER)
    monkeypatch.setenv('FP_OUT', str(tmp_path))
    for k, v in ENV.items(): monkeypatch.setenv(k, v)
    cfg = RunConfig.from_dict(BASE | {'output_dir': str(tmp_path / 'runs'), 'run_name': 'ddp', 'num_processes': 2,
                                      'stages': [SFT | {'max_steps': 3, 'batch_size': 4}]})
    res = launch(cfg, script=str(script))
    assert res.status == 'done'
    recs = {r: [json.loads(l) for l in (tmp_path / f'rank{r}.jsonl').read_text().splitlines()] for r in (0, 1)}
    assert [x['step'] for x in recs[0]] == [x['step'] for x in recs[1]] == [1, 2, 3]  # both ranks trained every step
    assert all(x['world'] == 2 for r in recs.values() for x in r)
    assert [x['sha'] for x in recs[0]] == [x['sha'] for x in recs[1]]  # gradients synchronised: same weights after each step
    assert len({x['sha'] for x in recs[0]}) == 3  # and the weights did change at every step
    saved = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob('adapter_model.safetensors'))
    assert saved == ['runs/ddp/final/adapter_model.safetensors', 'runs/ddp/stages/0-sft/adapter/adapter_model.safetensors']
    steps = [r['step'] for r in map(json.loads, (tmp_path / 'runs' / 'ddp' / 'metrics.jsonl').read_text().splitlines()) if 'loss' in r]
    assert steps == sorted(set(steps))  # one metrics line per logged step, not one per rank
