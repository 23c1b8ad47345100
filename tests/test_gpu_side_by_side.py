"""The GPU side-by-side benchmark (nbs/benchmarks/gpu_perf.py: ours, plain TRL and Unsloth; memory caps; checkpointing
on / off / auto; DPO; the longest context) and Unsloth in its offline bundle (gpu_bundle.py), checked on CPU at the
tiny shape: what a CPU can run runs, what it cannot is recorded with the reason, and the pure parts are checked with
fakes."""
import json, os, subprocess, sys, zipfile
from pathlib import Path
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'nbs' / 'benchmarks'
sys.path.insert(0, str(BENCH))
TINY = ['--shape', 'tiny', '--no_install', '--no_peak', '--quiet', '--threads', '1']

# --- the longest context: the search, with a fake `trains` --------------------------------------------------------------

@pytest.mark.parametrize('limit, longest, first_failing', [
    (12345, 12288, 12544),   # between two doublings: bisected to 256 tokens
    (8192, 8192, 8448),      # exactly a doubling
    (1023, 768, 1024),       # even the first length fails: bisected below it
    (100, 0, 256),           # nothing trains
    (10**6, 32768, None)])   # the ceiling trains: no failure, reached_ceiling
def test_longest_context_finds_the_boundary(limit, longest, first_failing):
    import gpu_perf as g
    tried = []
    def trains(n):
        tried.append(n); return n <= limit
    r = g.longest_context(trains, start=1024, ceiling=32768, step=256)
    assert (r['longest'], r['first_failing']) == (longest, first_failing)
    assert r['reached_ceiling'] == (longest == 32768) and not r['stopped']
    assert [t['length'] for t in r['trials']] == tried and all(n % 256 == 0 for n in tried) and len(set(tried)) == len(tried)
    assert all(t['trains'] == (t['length'] <= limit) for t in r['trials'])
    if first_failing: assert r['resolution'] == first_failing - longest <= 256
    if limit == 12345:  # doubling 1024 .. 16384, then 5 bisections of 8192 .. 16384
        assert tried == [1024, 2048, 4096, 8192, 16384, 12288, 14336, 13312, 12800, 12544]

def test_longest_context_stops_early_with_a_bracket():
    "A time limit ends the search between trials: the result still brackets the answer."
    import gpu_perf as g
    r = g.longest_context(lambda n: n <= 12345, stop=lambda: len(trials) >= 6, trials=(trials := []))
    assert r['stopped'] and len(r['trials']) == 6 and r['trials'] is trials
    assert r['longest'] <= 12345 < r['first_failing'] and (r['longest'], r['first_failing']) == (12288, 16384)
    with pytest.raises(ValueError, match='multiples of step'): g.longest_context(lambda n: True, start=1000)

def test_trial_errors_other_than_out_of_memory_stop_the_search():
    import gpu_perf as g
    def trains(n):
        if n > 2048: raise RuntimeError('CUDA error: an illegal memory access was encountered')
        return True
    trials = []
    with pytest.raises(RuntimeError, match='illegal memory access'): g.longest_context(trains, trials=trials)
    assert [t['length'] for t in trials] == [1024, 2048]
    assert g.is_oom(RuntimeError('CUDA out of memory. Tried to allocate 20.00 MiB')) and not g.is_oom(RuntimeError('illegal memory access'))
    import torch
    assert g.is_oom(torch.OutOfMemoryError('x')) and g.first_line(RuntimeError('a\nb')) == 'RuntimeError: a'

# --- the suite preset and the matrix -------------------------------------------------------------------------------------

def test_suite_side_by_side_expands_to_the_issue_matrix():
    """Typhoon-7B's shape, 4-bit + LoRA, SFT 2 x 2,048 and DPO 1 x 1,024 filled, paths ours / trl / unsloth, caps none / 24 /
    16 GiB, the longest context under 24 and 16 GiB: 9 processes; what the command line gives wins."""
    import gpu_perf as g
    a = g._cli(['--suite', 'side_by_side'])
    assert (a.shape, a.quantization, a.peft, a.fill, a.checkpointing, a.isolate, a.repeats) == ('7b', '4bit', 'lora', True, 'auto', 'yes', 1)
    assert g.settings(a) == {'sft': {'batch_size': 2, 'max_length': 2048, 'steps': 3}, 'dpo': {'batch_size': 1, 'max_length': 1024, 'steps': 3}}
    assert a.caps == [None, 24.0, 16.0] and a.context_cap_list == [24.0, 16.0] and a.max_context
    assert (a.context_start, a.context_ceiling, a.context_step, a.context_steps) == (1024, 32768, 256, 2) and 0 < a.deadline_s <= 480
    cells = g.expand_cells(a.path_list, a.caps, a.kinds, a.context_cap_list, a.repeats, a.max_context)
    assert [(c['memory_cap_gb'], c['path'], c['context']) for c in cells] == [
        (None, 'ours', False), (None, 'trl', False), (None, 'unsloth', False),
        (24.0, 'ours', True), (24.0, 'trl', True), (24.0, 'unsloth', True),
        (16.0, 'ours', True), (16.0, 'trl', True), (16.0, 'unsloth', True)]
    assert all(c['kinds'] == ['sft', 'dpo'] for c in cells)
    assert g._shares(cells) == [1, 1, 3, 2, 2, 4, 2, 2, 4]  # Unsloth twice (its first three times), a search twice
    a = g._cli(['--suite', 'side_by_side', '--paths', 'ours', '--memory_cap_gb', '16', '--steps', '5'])
    assert a.path_list == ['ours'] and a.caps == [16.0] and a.steps == 5 and a.shape == '7b'
    # without a suite: the earlier defaults (7b, SFT, ours and TRL, no cap, our checkpointing as a run decides it)
    a = g._cli([])
    assert (a.kinds, a.path_list, a.caps, a.checkpointing, a.batch_size, a.max_length, a.max_context) == (['sft'], ['ours', 'trl'], [None], 'auto', 4, 1024, False)
    assert g._cli(['--ours_checkpointing']).checkpointing == 'on'

@pytest.mark.parametrize('argv, message', [(['--memory_cap_gb', '16,x'], 'neither a size'), (['--memory_cap_gb', '0'], 'must be > 0'),
                                           (['--paths', 'ours,axolotl'], '--paths: axolotl'), (['--kind', 'ppo'], '--kind: ppo'),
                                           (['--shape', 'tiny', '--max_context'], 'must be multiples of --context_step')])
def test_cli_rejects_bad_options(argv, message, capsys):
    import gpu_perf as g
    with pytest.raises(SystemExit): g._cli(argv)
    assert message in capsys.readouterr().err

def test_table_and_goals_from_records():
    "The table per path, kind and cap, and the issue's goals computed from it (synthetic records, no training)."
    import gpu_perf as g
    rec = lambda p, k, c, tps, mem, **kw: {'path': p, 'kind': k, 'memory_cap_gb': c, 'status': 'ok', 'fits': True, 'tokens_per_s': tps,
                                           'peak_memory_bytes': mem, 'tokens': 4 * tps, 'steps': 5, 'flops_per_token': 10, **kw}
    runs = [rec('ours', 'sft', None, 900.0, 8), rec('unsloth', 'sft', None, 1000.0, 10), rec('ours', 'sft', 16.0, 800.0, 7, gradient_checkpointing=True),
            {'path': 'ours', 'kind': 'dpo', 'memory_cap_gb': 16.0, 'status': 'oom', 'fits': False, 'error': 'OutOfMemoryError: CUDA out of memory'},
            {'path': 'unsloth', 'kind': 'dpo', 'memory_cap_gb': 16.0, 'status': 'skipped', 'fits': None, 'why': 'unsloth is not installed'}]
    ctx = [{'path': 'ours', 'memory_cap_gb': 16.0, 'status': 'ok', 'longest': 10240}, {'path': 'trl', 'memory_cap_gb': 16.0, 'status': 'ok', 'longest': 1024},
           {'path': 'unsloth', 'memory_cap_gb': 16.0, 'status': 'ok', 'longest': 20480}]
    t = g.table(runs, ctx, {'flops_per_s': 1e4})
    assert [(r['path'], r['kind'], r['memory_cap_gb'], r['fits']) for r in t] == [
        ('ours', 'sft', None, True), ('unsloth', 'sft', None, True), ('ours', 'sft', 16.0, True), ('ours', 'dpo', 16.0, False), ('unsloth', 'dpo', 16.0, None)]
    assert t[0]['mfu'] == 900 * 10 / 1e4 and t[3]['why'].startswith('OutOfMemoryError') and t[4]['why'] == 'unsloth is not installed'
    assert g.goals(t, ctx) == {'ours_sft_fits_16gib': True, 'ours_dpo_fits_16gib': False, 'sft_tokens_per_s_ours_over_unsloth': 0.9,
                               'sft_peak_memory_ours_over_unsloth': 0.8, 'longest_context_16gib_ours_over_trl': 10.0,
                               'longest_context_16gib_ours_over_unsloth': 0.5}

# --- records filled to a length ------------------------------------------------------------------------------------------

def test_filled_records_are_the_length():
    "SFT and DPO records of the demo's own text, each exactly (within a few tokens of) the length once the chat template is applied."
    import gpu_perf as g
    from typhoon_nb.data import sample_lengths
    tok = g.tokenizer()
    for kind, n in (('sft', 160), ('dpo', 96), ('sft', 1024)):
        ds = g.filled_records(kind, tok, n, 3)
        lens = sample_lengths(tok, ds)
        assert len(ds) == 3 and all(n - 4 <= x <= n for x in lens), (kind, n, lens)
        assert ds[0] == ds[2] and ds[0] != ds[1]  # 2 distinct records, repeated
        text = g.as_text(ds, kind, tok)
        if kind == 'sft': assert [len(tok(t, add_special_tokens=False)['input_ids']) for t in text['text']] == lens
        else: assert text[0]['prompt'].endswith('<|im_start|>assistant\n') and text[0]['chosen'] == ds[0]['chosen'][0]['content'] + '<|im_end|>\n'
    with pytest.raises(ValueError, match='shorter than the chat template'): g.filled_records('sft', tok, 4, 1)

# --- what a CPU runs, and what it records as not applicable or skipped ----------------------------------------------------

def test_cpu_run_caps_unsloth_dpo_checkpointing_and_context(tmp_path):
    """At the tiny shape on CPU, in one command: SFT and DPO on our path and plain TRL with records filled to the length;
    each memory cap recorded as not applicable (a CUDA setting), Unsloth as skipped with the reason, our checkpointing
    as the memory plan decided it (auto: off where the run fits); the longest context (uncapped) to the shape's ceiling."""
    import gpu_perf as g
    out = tmp_path / 'r.json'
    g.main(TINY + ['--kind', 'sft,dpo', '--paths', 'ours,trl,unsloth', '--memory_cap_gb', 'none,24,16', '--steps', '2', '--batch_size', '2',
                   '--max_length', '128', '--dpo_batch_size', '1', '--dpo_max_length', '96', '--fill', '--max_context', '--context_start', '64',
                   '--context_step', '32', '--context_steps', '1', '--out', str(out)])
    res = json.loads(out.read_text())
    assert res['complete'] and res['memory_caps_gb'] == [None, 24.0, 16.0] and res['isolate'] is False
    runs = {(r['path'], r['kind'], r['memory_cap_gb']): r for r in res['runs']}
    assert len(runs) == len(res['runs']) == 3 * 2 * 3
    for (p, k, c), r in runs.items():
        if c is not None:
            assert r['status'] == 'n/a' and r['fits'] is None and r['why'].startswith('not applicable: a memory cap needs a CUDA device') and 'cpu' in r['why']
        elif p == 'unsloth': assert (r['status'], r['fits'], r['why']) == ('skipped', None, 'Unsloth needs a CUDA GPU; this run is on cpu')
        else:
            assert r['status'] == 'ok' and r['fits'] is True and r['tokens_per_s'] > 0 and r['peak_memory_bytes'] > 0
            steps_after_warmup = r['steps'] - 1
            if k == 'sft': assert r['tokens'] == steps_after_warmup * 2 * 128  # filled: 2 x 128 real tokens a step on both paths
            else: assert 2 * (96 - 8) <= r['tokens'] / steps_after_warmup <= 2 * 96  # one pair: chosen and rejected, ~96 tokens each
    ours = runs[('ours', 'sft', None)]
    assert (ours['checkpointing_asked'], ours['gradient_checkpointing'], ours['plan_fits']) == ('auto', False, True) and ours['plan_total_bytes'] > 0
    assert runs[('trl', 'dpo', None)]['gradient_checkpointing'] is True and runs[('trl', 'dpo', None)]['checkpointing_asked'] == 'TRL default'
    ctx = {(c['path'], c['memory_cap_gb']): c for c in res['max_context']}
    assert len(ctx) == 9 and all(c['status'] == 'n/a' for (p, cap), c in ctx.items() if cap is not None)
    assert ctx[('unsloth', None)]['status'] == 'skipped'
    for p in ('ours', 'trl'):
        c = ctx[(p, None)]
        assert (c['longest'], c['first_failing'], c['reached_ceiling']) == (256, None, True)
        assert [(t['length'], t['trains'], t['tokens']) for t in c['trials']] == [(64, True, 64), (128, True, 128), (256, True, 256)]
    assert {(r['path'], r['kind']) for r in res['table'] if r['memory_cap_gb'] is None and r['fits']} == {('ours', 'sft'), ('ours', 'dpo'), ('trl', 'sft'), ('trl', 'dpo')}

def test_checkpointing_on_off_auto(tmp_path, monkeypatch):
    """Our path's checkpointing: on and off as asked; auto as `plan_memory` decides it for the device: a (fake) GPU too
    small for the run without checkpointing turns it on, one large enough leaves it off."""
    import gpu_perf as g
    from typhoon_nb.config import RunConfig, StageConfig
    from typhoon_nb.memory import Device, plan_memory
    tok = g.tokenizer(); data = g.filled_records('sft', tok, 128, 4)
    ck = lambda **kw: (lambda r: (r['gradient_checkpointing'], r['checkpointing_asked']))(g.measure('ours', 'sft', 'tiny', '4bit', 'lora', 2, 2, 128, data, tok, **kw))
    assert ck(checkpointing='on') == (True, 'on') and ck(checkpointing='off') == (False, 'off')
    stage = StageConfig(kind='sft', data='demo:sft', batch_size=2, max_length=128, max_steps=2, save_steps=0, eval_samples=0, lr=2e-4, reference='entering')
    cfg = RunConfig(quantization='4bit', peft_method='lora', precision='auto', stages=[stage]).validate()
    gpu = lambda b: Device('fake GPU', 'cuda', b, b, True, 'given')
    rows = plan_memory(cfg, gpu(2**40), shape=g.plan_shape('tiny')).stages[0].rows
    assert rows['total_on'] < rows['total_off']
    seen = []
    def device_of(size):
        def plan_device(cap_gb, dev): seen.append(cap_gb); return gpu(size)
        return plan_device
    monkeypatch.setattr(g, 'plan_device', device_of((rows['total_on'] + rows['total_off']) // 2))
    r = g.measure('ours', 'sft', 'tiny', '4bit', 'lora', 2, 2, 128, data, tok, checkpointing='auto', cap_gb=16.0)
    assert (r['gradient_checkpointing'], r['checkpointing_asked'], r['plan_fits'], r['plan_total_bytes']) == (True, 'auto', True, rows['total_on'])
    assert seen == [16.0] and r['tokens_per_s'] > 0
    monkeypatch.setattr(g, 'plan_device', device_of(rows['total_off'] + 1))
    r = g.measure('ours', 'sft', 'tiny', '4bit', 'lora', 2, 2, 128, data, tok, checkpointing='auto')
    assert (r['gradient_checkpointing'], r['plan_total_bytes']) == (False, rows['total_off'])
    with pytest.raises(ValueError, match='checkpointing'): g.measure('ours', 'sft', 'tiny', '4bit', 'lora', 2, 2, 128, data, tok, checkpointing='maybe')

def test_unsloth_is_skipped_with_the_reason(monkeypatch):
    "On a CPU; where it is not installed; where transformers came first. The reason is the record: never a number."
    import gpu_perf as g, importlib.util
    out = g.run_cell({'path': 'unsloth', 'memory_cap_gb': 16.0, 'kinds': ['sft', 'dpo'], 'context': True})
    assert out['records'] == [{'path': 'unsloth', 'memory_cap_gb': 16.0, 'kind': k, 'status': 'skipped', 'fits': None,
                               'why': 'Unsloth needs a CUDA GPU; this run is on cpu'} for k in ('sft', 'dpo')]
    assert out['contexts'][0]['status'] == 'skipped' and out['unavailable']['why'].startswith('Unsloth needs a CUDA GPU')
    if importlib.util.find_spec('unsloth') is None:
        assert g.unsloth_unavailable('cuda') == ('skipped', 'unsloth is not installed (the bundle brings it: .gpu/wheels/unsloth)')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: object() if name == 'unsloth' else real(name, *a))
    import transformers  # noqa: F401  (already imported by now: Unsloth would patch too late)
    status, why = g.unsloth_unavailable('cuda')
    assert status == 'skipped' and why.startswith('Unsloth must be imported before transformers') and '--isolate yes' in why

# --- a process per cell -----------------------------------------------------------------------------------------------

def test_isolated_cells_run_in_their_own_processes(tmp_path):
    "--isolate yes: each path and cap in a fresh process (as on a GPU), its records merged into the one results file."
    import gpu_perf as g
    out = tmp_path / 'r.json'
    g.main(TINY + ['--paths', 'ours', '--kind', 'sft,dpo', '--isolate', 'yes', '--steps', '2', '--batch_size', '2', '--max_length', '64',
                   '--fill', '--checkpointing', 'on', '--deadline_s', '300', '--out', str(out)])
    res = json.loads(out.read_text())
    assert res['isolate'] is True and res['complete'] and res['deadline_s'] == 300
    assert [(r['path'], r['kind'], r['status'], r['gradient_checkpointing']) for r in res['runs']] == [('ours', 'sft', 'ok', True), ('ours', 'dpo', 'ok', True)]
    assert res['runs'][0]['peak_rss_bytes'] > 0 and res['runs'][0]['tokens'] == 2 * 64

def test_a_process_that_dies_or_overruns_is_recorded(tmp_path):
    "A process that exits with an error, or is ended at its time limit: its measurements recorded as failed, with why."
    import gpu_perf as g
    spec = {'path': 'ours', 'memory_cap_gb': None, 'kinds': ['sft'], 'context': True, 'tokenizer': str(tmp_path / 'no_tokenizer'), 'quiet': True}
    res = g.run_child(spec, timeout=240)
    assert [(r['kind'], r['status']) for r in res['records']] == [('sft', 'failed')] and res['contexts'][0]['status'] == 'failed'
    assert res['records'][0]['error'].startswith('its process exited with code 1: ') and res['exit'] == 'its process exited with code 1'
    res = g.run_child(spec | {'tokenizer': None}, timeout=1)
    assert res['records'][0]['error'].startswith('its process was ended after 1 s')

# --- Unsloth in the bundle -----------------------------------------------------------------------------------------------

def _zip(path:Path, files:dict) -> Path:
    with zipfile.ZipFile(path, 'w') as z:
        for n, data in files.items(): z.writestr(n, data)
    return path

def test_slim_wheel_drops_what_it_is_told(tmp_path):
    "slim_wheel with `drop`: the files and their RECORD lines go, the rest stays byte for byte (a dummy wheel)."
    import gpu_bundle as b
    files = {'unsloth/__init__.py': 'x = 1\n', 'studio/app.js': 'a' * 5000, 'unsloth_cli/main.py': 'cli\n',
             'unsloth-1.0.dist-info/RECORD': 'unsloth/__init__.py,sha256=a,6\nstudio/app.js,sha256=b,5000\nunsloth_cli/main.py,sha256=c,4\n'}
    (tmp_path / 'out').mkdir()
    w = b.slim_wheel(_zip(tmp_path / 'unsloth-1.0-py3-none-any.whl', files), tmp_path / 'out', drop=lambda n: n.startswith(b.SLIM_UNSLOTH))
    z = zipfile.ZipFile(w)
    assert sorted(z.namelist()) == ['unsloth-1.0.dist-info/RECORD', 'unsloth/__init__.py']
    assert z.read('unsloth-1.0.dist-info/RECORD').decode() == 'unsloth/__init__.py,sha256=a,6\n' and z.read('unsloth/__init__.py') == b'x = 1\n'

def test_unsloth_wheels_in_the_bundle_install(tmp_path):
    """The real Unsloth wheels as the bundle carries them: unsloth without Studio (under 3 MiB), pip-installable with the
    shared wheels into one folder, as run.sh does; the whole bundle with the repository under the 64 MiB a call carries."""
    import gpu_bundle as b
    src = b.ROOT / '.whl'
    for table in (b.WHEELS, b.UNSLOTH_WHEELS):
        if any(b.find_wheel(src, n, v) is None for n, v in table.items()):
            try: b.copy_wheels(tmp_path / 'dl', src, download=True, table=table)
            except (subprocess.CalledProcessError, FileNotFoundError) as e: pytest.skip(f'{src}: the wheels could not be downloaded ({e})')
    ws = b.copy_wheels(tmp_path / 'wheels' / 'unsloth', src, table=b.UNSLOTH_WHEELS)
    un = next(w for w in ws if w.name.startswith('unsloth-'))
    names = zipfile.ZipFile(un).namelist()
    assert un.stat().st_size < 3 * 2**20 and 'unsloth/__init__.py' in names and not any(n.startswith(b.SLIM_UNSLOTH) for n in names)
    shared = b.copy_wheels(tmp_path / 'wheels', src, slim_bnb=True)
    site = tmp_path / 'site_unsloth'
    cp = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--target', str(site),
                         '--python-version', '3.12', '--only-binary=:all:', *map(str, ws),
                         *[str(w) for w in shared if w.name.split('-')[0] in b.UNSLOTH_SHARED]], capture_output=True, text=True, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    have = dict(p.name.removesuffix('.dist-info').split('-') for p in site.glob('*.dist-info'))
    assert have == {'unsloth': '2026.10.9', 'unsloth_zoo': '2026.10.9', 'trl': '1.15.0', 'datasets': '4.8.5', 'cut_cross_entropy': '25.1.1',
                    'bitsandbytes': '0.50.2', 'peft': '0.21.2', 'dill': '0.4.1', 'multiprocess': '0.70.19'}
    assert (site / 'unsloth' / 'models' / 'mistral.py').exists() and not (site / 'studio').exists()
    d = tmp_path / 'gpu'
    info = b.make_bundle(d, src)
    assert sorted(info['unsloth_wheels']) == sorted(w.name for w in ws) and (d / 'wheels' / 'unsloth').is_dir()
    total = info['total_bytes'] + b.tracked_bytes()
    assert total < 60 * 2**20, f'{total / 2**20:.1f} MiB carried'
    assert subprocess.run(['bash', '-n', str(d / 'run.sh')]).returncode == 0
