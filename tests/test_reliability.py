"Reliability and safety: kill anywhere and resume, atomic checkpoints, disk full, fuzzed inputs, safe defaults (micro model)."
import ast, errno, json, math, multiprocessing as mp, os, random, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest

os.environ.setdefault('OMP_NUM_THREADS', '1')
ROOT = Path(__file__).resolve().parent.parent
from typhoon_nb.config import RunConfig, StageConfig, ConfigError

# --- a micro run on small data files ------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "Small JSONL files from the demo curriculum: train and held-out splits of every stage."
    from typhoon_nb.curriculum import demo_curriculum
    d = tmp_path_factory.mktemp('data')
    for k, recs in demo_curriculum(seed=0, n_pretrain=64, n_sft=64, n_dpo=32, n_eval=8).items():
        (d / f'{k}.jsonl').write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
    return d

def stages(data, steps=(6, 6, 4), save_steps=2):
    st = lambda kind, n, **kw: dict(kind=kind, data=str(data / f'{kind}_train.jsonl'), eval_data=str(data / f'{kind}_eval.jsonl'),
                                    lr=5e-3, max_steps=n, batch_size=4, max_length=64, save_steps=save_steps, eval_samples=2) | kw
    return [st('pretrain', steps[0], train_embeddings=True), st('sft', steps[1]), st('dpo', steps[2], lr=1e-3)]

def micro(out, name, stage_list, **kw) -> dict:
    return dict(model='micro-typhoon', quantization='none', precision='fp32', output_dir=str(out), run_name=name, lora_r=8,
                lora_alpha=16.0, lora_dropout=0.0, warmup_ratio=0.0, stages=stage_list) | kw

# --- 1. kill anywhere, resume, compare with the uninterrupted run ------------------------------------------------------
# Every job is a real training process, forked from this one after the heavy imports (`_warm`), so a trial does not pay
# seconds of imports, and killed with SIGKILL. Kill moments come from seeded generators and three kinds of moment:
# `timed`: after a random number of logged steps of a chosen stage plus a random delay; `mid-save`: in the middle of a
# checkpoint write (a non-empty folder under checkpoints/.staging); `stage-end`: after the stage's last checkpoint, as
# its adapter starts to be written (the job kills itself there, so the moment is exact).
N_TRIALS, PARALLEL, SEED0 = 12, 2, 1500
MODES = ['timed'] * 6 + ['stage-end'] * 3 + ['mid-save'] * 3

def _warm():
    "Import what a run imports, once, in the parent: forked jobs inherit the modules."
    import torch, transformers, peft, trl, datasets, matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot, safetensors.torch
    from trl import SFTTrainer, DPOTrainer
    from typhoon_nb import stages, data, loader, adapters, evaluate, refinements  # noqa: F401
    from typhoon_nb.loader import tiny_typhoon
    tiny_typhoon('micro')  # built and cached once

def _job(cfg_dict, resume, kill_stage=None):
    import torch
    from typhoon_nb import adapters
    from typhoon_nb.stages import run
    torch.set_num_threads(1)
    if kill_stage:  # SIGKILL this process as it starts writing the adapter of `kill_stage` (after its last checkpoint)
        save = adapters.save_adapter
        def save_adapter(model, folder, *a, **k):
            if f'-{kill_stage}/.tmp-adapter' in str(folder): os.kill(os.getpid(), signal.SIGKILL)
            return save(model, folder, *a, **k)
        adapters.save_adapter = save_adapter
    cfg = RunConfig(resume=resume, output_dir=str(Path(resume).parent)) if resume else RunConfig.from_dict(cfg_dict)
    run(cfg, progress=False, verbose=False)

def _start(cfg_dict=None, resume=None, kill_stage=None):
    p = mp.get_context('fork').Process(target=_job, args=(cfg_dict, resume, kill_stage), daemon=True)
    p.start(); return p

def _lines(rd) -> int:
    try: return (rd / 'metrics.jsonl').read_bytes().count(b'\n')
    except FileNotFoundError: return 0

def _records(rd) -> list[dict]: return [json.loads(l) for l in (rd / 'metrics.jsonl').read_text().splitlines()]

def _valid_checkpoint(ck) -> bool:
    "The test's own check, independent of the COMPLETE marker: every part of the checkpoint loads and says its step."
    import torch
    from safetensors import safe_open
    from transformers.trainer import safe_globals  # numpy RNG state, as transformers reads it back
    try:
        if json.loads((ck / 'trainer_state.json').read_text())['global_step'] != int(ck.name.split('-')[1]): return False
        with safe_open(str(ck / 'adapter_model.safetensors'), 'pt') as f: [f.get_tensor(k) for k in f.keys()]
        with safe_globals():
            for n in ('optimizer.pt', 'scheduler.pt', 'rng_state.pth'): torch.load(ck / n, weights_only=True)
        return True
    except Exception: return False

def _snapshot(rd) -> dict:
    "At the kill: per stage, the checkpoints that are whole (test's check) and what was left half-written."
    out = {}
    for sd in sorted((rd / 'stages').glob('*')) if (rd / 'stages').is_dir() else []:
        name = sd.name.split('-', 1)[1]; ckd = sd / 'checkpoints'
        cks = [p for p in ckd.glob('checkpoint-*')] if ckd.is_dir() else []
        half = [f'.staging/{p.name}' for p in (ckd / '.staging').glob('*') if any(p.iterdir())] if (ckd / '.staging').is_dir() else []
        half += [p.name for p in cks if not _valid_checkpoint(p)] + [p.name for p in sd.glob('.tmp-*')]
        out[name] = {'valid': sorted((p.name for p in cks if _valid_checkpoint(p)), key=lambda n: int(n.split('-')[1])), 'half': half}
    return out

class Trial:
    def __init__(self, k, out, cfg, ref_lines):
        self.k, self.seed, self.mode, self.t0 = k, SEED0 + k, MODES[k], time.time()
        rng = random.Random(self.seed)
        self.stage = ('pretrain', 'sft', 'dpo')[k % 3]
        idx = [i for i, r in enumerate(ref_lines) if r['stage'] == self.stage]
        self.after = rng.choice(idx) if self.mode == 'timed' else idx[0]  # logged lines before the moment
        self.delay = round(rng.uniform(0, 0.3), 3) if self.mode == 'timed' else 0.0
        self.rd = out / f'trial{k}'
        self.cfg = cfg | {'run_name': self.rd.name}
        self.proc = _start(self.cfg, kill_stage=self.stage if self.mode == 'stage-end' else None)
        self.phase, self.t_reached = 'kill', None
        self.killed_at = self.snap = self.result = self.wall_s = None

    def poll(self):
        if self.phase == 'kill':
            if self.proc.exitcode is not None and not (self.mode == 'stage-end' and self.proc.exitcode == -signal.SIGKILL):
                self.phase, self.result = 'done', f'not killed: the job ended first (exit {self.proc.exitcode})'; return
            if self.proc.exitcode is not None or self._moment():
                if self.proc.exitcode is None: os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.join()
                man = json.loads((self.rd / 'manifest.json').read_text()) if (self.rd / 'manifest.json').exists() else {}
                running = [n for n, s in man.get('stages', {}).items() if s.get('status') == 'running']
                self.killed_at = {'stage': running[0] if running else None, 'logged_lines': _lines(self.rd), 'exit': self.proc.exitcode}
                self.snap = _snapshot(self.rd)
                self.proc, self.phase = _start(resume=str(self.rd)), 'resume'
        elif self.phase == 'resume' and self.proc.exitcode is not None:
            self.phase, self.result, self.wall_s = 'done', f'resume exit {self.proc.exitcode}', round(time.time() - self.t0, 1)

    def _moment(self) -> bool:
        if self.mode == 'stage-end' or _lines(self.rd) < self.after: return False
        if self.mode == 'timed':
            self.t_reached = self.t_reached or time.time()
            return time.time() - self.t_reached >= self.delay
        stg = next(iter((self.rd / 'stages').glob(f'*-{self.stage}/checkpoints/.staging')), None)
        return stg is not None and any(any(p.iterdir()) for p in stg.iterdir() if p.is_dir())

def _loss_by_step(rd):
    "(stage, step) -> (loss, grad_norm, learning_rate): the last record of each step (a resumed run logs some steps twice)."
    return {(r['stage'], r['step']): (r['loss'], r.get('grad_norm'), r.get('learning_rate')) for r in _records(rd) if 'loss' in r}

def _summary(rd):
    s = json.loads((rd / 'summary.json').read_text())
    return s['status'], {n: {k: v for k, v in st.items() if k != 'wall_s'} for n, st in s['stages'].items()}

def _final_weights(rd):
    from safetensors.torch import load_file
    return load_file(str(rd / 'final' / 'adapter_model.safetensors'))

def test_kill_anywhere_and_resume(data, tmp_path, capsys):
    _warm()
    cfg = micro(tmp_path / 'runs', 'reference', stages(data))
    t_ref = time.time(); ref = _start(cfg); ref.join(300); t_ref = time.time() - t_ref
    assert ref.exitcode == 0
    rrd = tmp_path / 'runs' / 'reference'
    ref_lines, ref_loss, ref_sum, ref_w = _records(rrd), _loss_by_step(rrd), _summary(rrd), _final_weights(rrd)
    assert ref_sum[0] == 'done' and [ref_sum[1][s]['steps'] for s in ('pretrain', 'sft', 'dpo')] == [6, 6, 4]
    todo, active, trials, t0 = list(range(N_TRIALS)), [], [], time.time()
    while todo or active:
        while todo and len(active) < PARALLEL: t = Trial(todo.pop(0), tmp_path / 'runs', cfg, ref_lines); active.append(t); trials.append(t)
        for t in active: t.poll()
        active = [t for t in active if t.phase != 'done']
        assert time.time() - t0 < 900, 'trials took too long'
        time.sleep(0.002)
    rows = []
    for t in trials:
        man = json.loads((t.rd / 'manifest.json').read_text())
        picked = {r['stage']: r['checkpoint'] for r in man.get('resumes', [])}
        rows.append({'trial': t.k, 'seed': t.seed, 'mode': t.mode, 'target_stage': t.stage, 'after_logged_lines': t.after,
                     'delay_s': t.delay, 'killed_in': t.killed_at, 'half_written_at_kill': {n: s['half'] for n, s in (t.snap or {}).items() if s['half']},
                     'resumed_from': picked, 'result': t.result, 'wall_s': t.wall_s})
    with capsys.disabled():
        print(f'\nkill-anywhere: uninterrupted run {t_ref:.1f} s, {len(rows)} trials in {time.time() - t0:.0f} s ({PARALLEL} at a time)')
        print('trials (seed, moment, where the kill landed, what resume picked):')
        for r in rows: print('  ' + json.dumps(r, ensure_ascii=False))
    for t, row in zip(trials, rows):
        assert t.result == 'resume exit 0', row
        assert t.killed_at['exit'] == -signal.SIGKILL, row
        # no resume picked a half-written checkpoint: what it picked was whole at the kill, and the newest whole one
        for stage, ck in row['resumed_from'].items():
            valid = t.snap.get(stage, {}).get('valid', [])
            assert ck is None and not valid or ck == valid[-1], (row, stage, valid)
        # the resumed run ends where the uninterrupted one did
        status, summ = _summary(t.rd)
        assert status == 'done', row
        for st, d in ref_sum[1].items():
            for k, v in d.items():
                assert summ[st][k] == (pytest.approx(v, abs=1e-6) if isinstance(v, float) else v), (row, st, k)
        got = _loss_by_step(t.rd)
        assert set(got) == set(ref_loss), row
        for key, vals in ref_loss.items():
            assert got[key] == pytest.approx(vals, abs=1e-6), (row, key)
        w = _final_weights(t.rd)
        assert set(w) == set(ref_w) and max(float((w[k] - ref_w[k]).abs().max()) for k in w) <= 1e-6, row
    killed_in = {r['killed_in']['stage'] for r in rows}
    assert {'pretrain', 'sft', 'dpo'} <= killed_in, killed_in  # the kills landed in all three stages
    assert sum(1 for r in rows if r['half_written_at_kill']) >= 3  # and at least three cut a checkpoint write in half
    ends = [r for r in rows if r['mode'] == 'stage-end']  # and three came after a stage's last checkpoint, one per stage
    assert sorted(r['killed_in']['stage'] for r in ends) == ['dpo', 'pretrain', 'sft']
    assert all(r['resumed_from'][r['killed_in']['stage']] == f"checkpoint-{ref_sum[1][r['killed_in']['stage']]['steps']}" for r in ends), ends
    assert len(rows) >= 10

# --- 2. disk full / unwritable output, through run(cfg) ------------------------------------------------------------------
# A real small filesystem (tmpfs) holds the run folder; when the stage has logged step 3 (checkpoint-2 is on disk), the test
# fills the filesystem but for a little slack, or makes the checkpoints folder read-only (a read-only bind mount as root,
# file permissions otherwise). Saving checkpoint-4 must then stop the run with our message naming the folder, leave
# checkpoint-2 whole, and a resume from it (once space is back) must end where an uninterrupted run ends.
def _sh(*cmd): return subprocess.run(cmd, capture_output=True, text=True)

@pytest.fixture
def small_fs(tmp_path):
    "A 16 MiB tmpfs (root only)."
    mnt = tmp_path / 'small'; mnt.mkdir()
    if os.geteuid() != 0: pytest.skip('a disk-full test needs root to mount a small tmpfs')
    r = _sh('mount', '-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', str(mnt))
    if r.returncode: pytest.skip(f'cannot mount a tmpfs here: {r.stderr.strip()}')
    yield mnt
    _sh('umount', '-l', str(mnt))

def _sft_only(data, out, name):
    return micro(out, name, [dict(kind='sft', data=str(data / 'sft_train.jsonl'), eval_data=str(data / 'sft_eval.jsonl'), lr=5e-3,
                                  max_steps=6, batch_size=4, max_length=64, save_steps=2, eval_samples=0)])

def _fill(folder, slack=256 * 1024):
    st = os.statvfs(folder); free = st.f_bavail * st.f_frsize
    with open(folder / 'filler', 'wb') as f: f.write(b'\0' * max(free - slack, 0))

def _fault_test(data, tmp_path, out, fault, undo, why):
    from typhoon_nb.stages import run, RunError, verify_checkpoint
    ref = run(RunConfig.from_dict(_sft_only(data, tmp_path / 'ref', 'ref')), progress=False, verbose=False)
    cfg = RunConfig.from_dict(_sft_only(data, out, 'run'))
    rd = out / 'run'; ckd = rd / 'stages' / '0-sft' / 'checkpoints'
    hit = []
    def listener(rec):
        if rec.get('step') == 3 and 'loss' in rec and not hit: hit.append(fault(ckd))
    try:
        with pytest.raises(RunError) as ei: run(cfg, progress=False, listener=listener, verbose=False)
        msg = str(ei.value)
        assert hit and f'stage sft: could not write checkpoint-4 to {ckd}: {why}' in msg, msg
        assert f'the previous checkpoint {ckd / "checkpoint-2"} is intact' in msg and 'then resume the run' in msg, msg
        assert sorted(p.name for p in ckd.glob('checkpoint-*')) == ['checkpoint-2']
        assert verify_checkpoint(ckd / 'checkpoint-2') is None and _valid_checkpoint(ckd / 'checkpoint-2')
        assert not (ckd / STAGING_ / 'checkpoint-4').exists()  # the failed save left nothing half-written
    finally: undo(ckd)
    man = json.loads((rd / 'manifest.json').read_text())
    assert man['status'] == 'failed' and man['stages']['sft']['status'] == 'failed' and why in man['error']
    res = run(RunConfig(resume=str(rd), output_dir=str(out)), progress=False, verbose=False)
    man = json.loads((rd / 'manifest.json').read_text())
    assert res.status == 'done' and man['resumes'][-1] == man['resumes'][-1] | {'stage': 'sft', 'checkpoint': 'checkpoint-2'}
    assert [(s.steps, s.tokens) for s in res.stages] == [(s.steps, s.tokens) for s in ref.stages] == [(6, ref.stages[0].tokens)]
    w, rw = _final_weights(rd), _final_weights(ref.run_dir)
    assert max(float((w[k] - rw[k]).abs().max()) for k in rw) <= 1e-6

STAGING_ = '.staging'

def test_disk_full_keeps_the_previous_checkpoint(data, tmp_path, small_fs):
    _fault_test(data, tmp_path, small_fs, lambda ckd: _fill(small_fs), lambda ckd: (small_fs / 'filler').unlink(missing_ok=True),
                'no space left on the device')

def test_read_only_output_keeps_the_previous_checkpoint(data, tmp_path):
    out = tmp_path / 'out'
    if os.geteuid() == 0:  # root writes through permissions: a read-only bind mount of the checkpoints folder instead
        def fault(ckd):
            r1, r2 = _sh('mount', '--bind', str(ckd), str(ckd)), _sh('mount', '-o', 'remount,bind,ro', str(ckd))
            if r1.returncode or r2.returncode: pytest.skip(f'cannot bind-mount read-only here: {r1.stderr or r2.stderr}')
        undo, why = lambda ckd: _sh('umount', str(ckd)), 'read-only file system'
    else:
        def fault(ckd):
            for p in (ckd / STAGING_, ckd): p.chmod(0o555)
        undo, why = lambda ckd: [p.chmod(0o755) for p in (ckd, ckd / STAGING_) if p.exists()], 'permission denied'
    _fault_test(data, tmp_path, out, fault, undo, why)

# --- 3. fuzzed inputs: records to the data layer, dicts to RunConfig ---------------------------------------------------
# Every generated input is either accepted or rejected with our own error class and a message that names where the
# problem is (file and line, or record, and the field); an exception of any other class fails the test.
from hypothesis import given, settings, HealthCheck, example, strategies as hs

_CHARS = hs.characters(codec=None, categories=['Lu', 'Ll', 'Lo', 'Mn', 'Nd', 'Zs', 'Cc', 'Cf', 'Cs', 'Po', 'So'])  # Cs: lone surrogates
_TEXT = hs.one_of(hs.text(_CHARS, max_size=12), hs.sampled_from(['', ' ', '\n', '\ud800', 'a\udfffb', '\x00', 'สวัสดีครับ', 'ก\u0e48\u0e48',
                                                                '\u200b', '\ufeff']),
                  hs.builds(lambda c, n: c * n, hs.sampled_from(['x', 'ก', '\ud800']), hs.sampled_from([0, 1, 5000, 200_000])))
_JUNK = hs.recursive(hs.none() | hs.booleans() | hs.integers(-2**70, 2**70) | hs.floats() | _TEXT,
                     lambda c: hs.lists(c, max_size=3) | hs.dictionaries(_TEXT, c, max_size=3), max_leaves=8)
_ROLE = hs.sampled_from(['user', 'assistant', 'system', 'human', 'gpt', 'USER', '', 'tool']) | _JUNK
_MSG = hs.fixed_dictionaries({'role': _ROLE, 'content': _TEXT | _JUNK}) | _JUNK
_MSGS = hs.lists(_MSG, max_size=4) | _JUNK
_TURNS = _TEXT | _MSGS
_RECORD = {
    'pretrain': hs.fixed_dictionaries({'text': _TEXT | _JUNK}) | hs.dictionaries(_TEXT, _JUNK, max_size=3),
    'sft': hs.one_of(hs.fixed_dictionaries({'messages': _MSGS}), hs.fixed_dictionaries({'conversations': hs.lists(hs.fixed_dictionaries({'from': _ROLE, 'value': _TEXT | _JUNK}), max_size=4) | _JUNK}),
                     hs.fixed_dictionaries({'instruction': _TEXT | _JUNK, 'output': _TEXT | _JUNK}, optional={'input': _TEXT | _JUNK, 'system': _TEXT | _JUNK}),
                     hs.fixed_dictionaries({'prompt': _TURNS, 'completion': _TURNS}), hs.dictionaries(_TEXT, _JUNK, max_size=3)),
    'dpo': hs.one_of(hs.fixed_dictionaries({'prompt': _TURNS, 'chosen': _TURNS, 'rejected': _TURNS}),
                     hs.fixed_dictionaries({'chosen': _MSGS, 'rejected': _MSGS}), hs.dictionaries(_TEXT, _JUNK, max_size=3)),
}
_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)

def _check_data(kind, source, n, name):
    "load_records on `source` with both policies: accepted with counts that add up, or a DataError naming the place."
    from typhoon_nb.data import load_records, DataError
    for policy in ('error', 'skip'):
        try: ds, rep = load_records(source, kind, on_bad_record=policy)
        except DataError as e:
            msg = str(e)
            assert name in msg, msg
            if policy == 'error' and e.report is not None:  # every listed problem names its line / record, and a field where one is at fault
                assert all(re.match(rf'{re.escape(name)} (line|record) \d+: ', p) for p in e.problems), e.problems
            continue
        assert rep.read == n and rep.kept + rep.n_rejected == n and len(ds) == rep.kept, rep
        assert policy == 'skip' or rep.n_rejected == 0
        json.dumps(rep.to_dict(), ensure_ascii=False).encode('utf-8')  # the report can be written to the manifest

import re

@pytest.mark.parametrize('kind', ['pretrain', 'sft', 'dpo'])
def test_fuzzed_records_in_memory(kind):
    @_FUZZ
    @given(hs.lists(_RECORD[kind] | _JUNK, min_size=1, max_size=5))
    def check(recs): _check_data(kind, recs, len(recs), '<records>')
    check()

@pytest.mark.parametrize('kind', ['pretrain', 'sft', 'dpo'])
def test_fuzzed_jsonl_files(kind, tmp_path_factory):
    d = tmp_path_factory.mktemp('fuzz')
    @_FUZZ
    @given(hs.lists(_RECORD[kind].map(lambda r: json.dumps(r).encode()) | _JUNK.map(lambda r: json.dumps(r).encode())
                    | hs.binary(min_size=1, max_size=40) | hs.sampled_from([b'[' * 100_000, b'{"text": "\\ud800"}', b'{"text": "a', b'\xff\xfe{}']),
                    min_size=1, max_size=5))
    def check(lines):
        p = d / f'{kind}.jsonl'
        p.write_bytes(b'\n'.join(l.replace(b'\n', b' ') for l in lines) + b'\n')
        n = sum(1 for l in lines if l.replace(b'\n', b' ').strip())
        if n == 0: return
        _check_data(kind, str(p), n, f'{kind}.jsonl')
    check()

_RUN_FIELDS = [f.name for f in __import__('dataclasses').fields(RunConfig)]
_STAGE_FIELDS = [f.name for f in __import__('dataclasses').fields(StageConfig)]
_VALUE = _JUNK | hs.sampled_from(['none', '1e3', 'inf', 'nan', '-1', 'true', '[1, 2]', '{a: 1}', '[' * 5000, 'demo:sft', 'lora', '4bit'])
_STAGE = hs.dictionaries(hs.sampled_from(_STAGE_FIELDS) | _TEXT, _VALUE, max_size=6) | _JUNK
_CONFIG = hs.dictionaries(hs.sampled_from(_RUN_FIELDS) | _TEXT, _VALUE, max_size=6).flatmap(
    lambda d: hs.just(d) | hs.lists(_STAGE, max_size=3).map(lambda s: d | {'stages': s}))

def _names_a_field(problem:str) -> bool:
    "Whether `problem` starts with a path: `field: `, `stages[1].field: `, `config: `, or a quoted / literal odd key."
    head = problem.split(': ', 1)[0]
    if head == 'config' or head.startswith('stages'): return True
    last = head.split('.')[-1] if not head.startswith(("'", '"')) else head
    try: ast.literal_eval(last); return True  # 'odd key', 12, None, ...
    except (ValueError, SyntaxError): return last.isidentifier()

def _check_config(d, **kw):
    try: cfg = RunConfig.from_dict(d, **kw)
    except ConfigError as e:
        assert e.problems and str(e).startswith('invalid config')
        assert all(_names_a_field(p) for p in e.problems), e.problems  # each problem starts with the field it is about
        return
    cfg.validate()  # what was accepted stays valid, can be written as YAML and read back the same
    assert RunConfig.from_yaml(cfg.to_yaml().encode('utf-8').decode('utf-8')) == cfg

@_FUZZ
@given(_CONFIG)
def test_fuzzed_configs(d):
    _check_config(d)
    _check_config(d, parse_strings=True)

@_FUZZ
@example({'stages': '9' * 5000}).via('a YAML number too long for int()')
@example({'stages': '[' * 5000, 'lora_targets': '[' * 5000}).via('YAML nested too deeply')
@given(hs.dictionaries(hs.sampled_from(_RUN_FIELDS), _TEXT | hs.sampled_from(['none', 'inf', 'nan', '1e400', '9' * 5000, '[' * 5000, '[{kind: sft}]']), max_size=6))
def test_fuzzed_job_parameters(d):
    "Papermill parameters are strings: parsed into the fields' types, never evaluated."
    try: cfg = RunConfig.from_flat(d)
    except ConfigError as e: assert e.problems; return
    cfg.validate()

@pytest.mark.parametrize('d, problem', [
    ({'run_name': 'a\x00b'}, "run_name: contains a NUL or an unpaired surrogate character"),
    ({'output_dir': 'runs/\ud800'}, "output_dir: contains a NUL or an unpaired surrogate character"),
    ({'stages': [{'kind': 'sft', 'data': 'x\x00.jsonl'}]}, "stages[0].data: contains a NUL or an unpaired surrogate character"),
    ({'': 1}, "'': unknown field"),
    ({'\ud800' * 100: 1}, "'" + '\\ud800' * 40 + "...': unknown field"),
])
def test_config_odd_strings_are_named(d, problem):
    "Strings no path can hold are refused by validation (not later, deep in the filesystem), and odd keys are quoted."
    with pytest.raises(ConfigError) as ei: RunConfig.from_dict(d)
    assert any(p.startswith(problem) for p in ei.value.problems), ei.value.problems

# --- 4. safe defaults ----------------------------------------------------------------------------------------------------
def test_remote_code_is_refused_unless_asked(data, tmp_path):
    "A local model folder that ships its own code (`auto_map`): refused with our message; the code never runs."
    from typhoon_nb.loader import tiny_typhoon, LoaderError
    from typhoon_nb.stages import run
    src, m = tiny_typhoon('micro'), tmp_path / 'custom'
    shutil.copytree(src, m)
    ran = tmp_path / 'remote-code-ran'
    (m / 'modeling_custom.py').write_text(textwrap.dedent(f'''
        import pathlib; pathlib.Path({str(ran)!r}).write_text('ran')
        from transformers import MistralConfig, MistralForCausalLM
        class CustomConfig(MistralConfig): model_type = 'typhoon_custom'
        class CustomModel(MistralForCausalLM): config_class = CustomConfig
    '''))
    conf = json.loads((m / 'config.json').read_text())
    conf |= {'model_type': 'typhoon_custom', 'architectures': ['CustomModel'],
             'auto_map': {'AutoConfig': 'modeling_custom.CustomConfig', 'AutoModelForCausalLM': 'modeling_custom.CustomModel'}}
    (m / 'config.json').write_text(json.dumps(conf))
    cfg = RunConfig.from_dict(_sft_only(data, tmp_path / 'runs', 'remote') | {'model': str(m)})
    assert cfg.trust_remote_code is False  # the default
    with pytest.raises(LoaderError) as ei: run(cfg, progress=False, verbose=False)
    assert f"{m / 'config.json'}: model_type 'typhoon_custom' (CustomModel) is not supported" in str(ei.value), str(ei.value)
    assert 'ships its own model code (auto_map): set trust_remote_code: true if you trust it' in str(ei.value)
    assert not ran.exists()
    man = json.loads((tmp_path / 'runs' / 'remote' / 'manifest.json').read_text())
    assert man['status'] == 'failed' and 'is not supported' in man['error']

def test_pickle_checkpoint_is_refused_on_resume(data, tmp_path):
    "A checkpoint whose weights are pickle only (a complete marker and all) is refused on resume unless allow_pickle."
    import torch
    from safetensors.torch import load_file
    from typhoon_nb.stages import run, RunError, mark_complete, COMPLETE
    cfg = RunConfig.from_dict(_sft_only(data, tmp_path, 'pk'))
    def stop(rec):
        if rec.get('step') == 3 and 'loss' in rec: raise KeyboardInterrupt('stopped by the test')
    with pytest.raises(KeyboardInterrupt): run(cfg, progress=False, listener=stop, verbose=False)
    ck = tmp_path / 'pk' / 'stages' / '0-sft' / 'checkpoints' / 'checkpoint-2'
    st = ck / 'adapter_model.safetensors'
    torch.save(load_file(str(st)), ck / 'adapter_model.bin'); st.unlink(); (ck / COMPLETE).unlink()
    mark_complete(ck, step=2, stage='sft')  # whole, as far as the marker goes: only the format is wrong
    with pytest.raises(RunError) as ei: run(RunConfig(resume=str(tmp_path / 'pk'), output_dir=str(tmp_path)), progress=False, verbose=False)
    assert f'checkpoint {ck}: only pickle weights (adapter_model.bin) found; loading pickle can run arbitrary code' in str(ei.value)
    assert 'allow_pickle: true' in str(ei.value)

_HOSTILE = ["'); import os; os.system('touch PWNED'); ('", '"""\nimport os\n"""', "\\'; x = 1 #", '${HOME} $(id) `id`',
            "!!python/object/apply:os.system ['touch PWNED']", "__import__('os').system('touch PWNED')", 'ก\u0e48\n\r\t\\x00']

@pytest.mark.parametrize('value', _HOSTILE)
def test_job_parameters_are_injected_as_plain_literals(value, tmp_path):
    "papermill writes each parameter as a literal into the job notebook: a hostile string reads back as the same string."
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    from typhoon_nb.jobs import write_job_notebook, job_config
    nb = load_notebook_node(str(write_job_notebook(tmp_path / 'job.ipynb')))  # as papermill reads it before injecting
    nb = parameterize_notebook(nb, {'run_name': value, 'model': value, 'lora_r': value}, kernel_name='python3', language='python')
    cell = next(c for c in nb.cells if 'injected-parameters' in c.metadata.get('tags', []))
    tree = ast.parse(cell.source)
    assigned = {}
    for node in tree.body:  # nothing but NAME = <literal>
        assert isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name), ast.dump(node)
        assigned[node.targets[0].id] = ast.literal_eval(node.value)
    assert assigned == {'run_name': value, 'model': value, 'lora_r': value}
    with pytest.raises(ConfigError) as ei: job_config(assigned)
    assert any(p.startswith('lora_r: expected int, got str') for p in ei.value.problems)
    assert not list(tmp_path.glob('PWNED')) and not Path('PWNED').exists()

_GUARD = """
import importlib.abc, os, socket, sys
_log = os.environ['NET_ATTEMPTS']
def _refuse(self, address, *a, **k):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        with open(_log, 'a') as f: f.write(repr(address) + '\\n')
        raise OSError(101, f'network blocked by the test: {address}')
    return _connect(self, address, *a, **k)
_connect = socket.socket.connect
socket.socket.connect = _refuse
socket.socket.connect_ex = lambda self, address: _refuse(self, address)

# Every CPU takes bitsandbytes' AVX512-BF16 branch, the one that asks the hub for a kernel when bitsandbytes is
# imported: its CPU feature check answers yes, and says in BF16_ASKED that it was asked.
class _Bf16Yes(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != 'bitsandbytes.functional': return None
        import importlib.machinery
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        inner = spec.loader
        class _L(importlib.abc.Loader):
            def create_module(self, s): return inner.create_module(s)
            def exec_module(self, m):
                inner.exec_module(m)
                def has_avx512bf16():
                    with open(os.environ['BF16_ASKED'], 'a') as f: f.write('asked\\n')
                    return True
                m.has_avx512bf16 = has_avx512bf16
        spec.loader = _L()
        return spec
sys.meta_path.insert(0, _Bf16Yes())
"""

def _guarded(tmp_path) -> tuple[dict, Path, Path]:
    "Environment of a subprocess with every TCP connect refused and logged, the hub at an unreachable address, offline mode off."
    (tmp_path / 'guard').mkdir(exist_ok=True); (tmp_path / 'guard' / 'sitecustomize.py').write_text(_GUARD)
    attempts, asked = tmp_path / 'attempts.log', tmp_path / 'bf16_asked.log'
    env = {k: v for k, v in os.environ.items() if k not in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE', 'HF_DATASETS_OFFLINE', 'TYPHOON_NB_HUB_KERNELS')}
    env |= {'HF_ENDPOINT': 'http://127.0.0.1:9', 'NET_ATTEMPTS': str(attempts), 'BF16_ASKED': str(asked), 'OMP_NUM_THREADS': '1',
            'PYTHONPATH': os.pathsep.join([str(tmp_path / 'guard'), str(ROOT)])}
    return env, attempts, asked

def _no_attempt(p, attempts, asked):
    "The subprocess passed, tried no connection, took the bf16 branch of bitsandbytes, and printed no notice of the hub."
    assert p.returncode == 0, p.stderr[-3000:]
    assert not attempts.exists() or attempts.read_text() == '', attempts.read_text()
    import importlib.util
    bnb_f = importlib.util.find_spec('bitsandbytes.functional')
    if bnb_f and 'has_avx512bf16' in Path(bnb_f.origin).read_text():  # where bitsandbytes has the check (0.50 has, 0.48 has none)
        assert asked.exists() and 'asked' in asked.read_text()  # bitsandbytes asked its CPU feature check: the branch ran
    out = p.stdout + p.stderr
    for notice in ('publisher trust', 'kernels-community', 'gemm_4bit_forward'): assert notice not in out, out[-3000:]

def test_no_network_is_needed_or_attempted(data, tmp_path):
    "A micro run end to end (4-bit base), then `typhoon-nb chat` on it, with every TCP connect refused: no attempt, no hub notice."
    env, attempts, asked = _guarded(tmp_path)
    cfg = micro(tmp_path / 'runs', 'offline', stages(data, steps=(2, 2, 2)), quantization='4bit', precision='auto')
    code = textwrap.dedent(f"""
        import socket; assert socket.socket.connect.__name__ == '_refuse'  # the guard is installed
        from typhoon_nb.config import RunConfig
        from typhoon_nb.stages import run
        res = run(RunConfig.from_dict({cfg!r}), progress=False, verbose=False)
        print('status', res.status)
    """)
    p = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _no_attempt(p, attempts, asked)
    assert 'status done' in p.stdout
    assert json.loads((tmp_path / 'runs' / 'offline' / 'summary.json').read_text())['status'] == 'done'
    asked.unlink()
    p = subprocess.run([sys.executable, '-m', 'typhoon_nb.jobs', 'chat', str(tmp_path / 'runs' / 'offline'), '--prompt', 'สวัสดี',
                        '--max_new_tokens', '4'], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _no_attempt(p, attempts, asked)
    assert p.stdout.startswith('final> '), p.stdout

def test_every_module_imports_without_network(tmp_path):
    "Each module of the package, imported in a fresh process under the same guard (bf16 branch taken): no connection attempt."
    import pkgutil, typhoon_nb
    mods = sorted(m.name for m in pkgutil.walk_packages(typhoon_nb.__path__, 'typhoon_nb.'))
    assert {'typhoon_nb.loader', 'typhoon_nb.offline', 'typhoon_nb.patches.gqa'} <= set(mods)
    env, attempts, asked = _guarded(tmp_path)
    code = 'import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\nimport bitsandbytes\nprint(len(sys.argv) - 1)'
    p = subprocess.run([sys.executable, '-c', code, *mods], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    _no_attempt(p, attempts, asked)
    assert p.stdout.strip() == str(len(mods))
