"""Smoke run of the performance suite (nbs/benchmarks/perf_suite.ipynb) with tiny sizes, and the CPU-runnable parts of
nbs/benchmarks/gpu_perf.py at a tiny shape."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'nbs' / 'benchmarks'
sys.path.insert(0, str(BENCH))
FIELDS = ('case', 'ours_tokens_per_s', 'baseline_tokens_per_s', 'ratio', 'mfu', 'peak_memory_bytes', 'machine', 'repeats')
SMOKE = dict(shape='tiny', steps=2, repeats=1, batch_size=4, max_length=48, n_train=64, dpo_steps=2, memory_steps=2,
             memory_configs=['4bit/lora', 'none/prefix'], levers=['packing', 'row_packing'], profile_steps=2, threads=2, threads_compare=1,
             warmup_runs=1, peak_sizes=[128, 256])

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    pm = pytest.importorskip('papermill')
    td = tmp_path_factory.mktemp('perf')
    params = SMOKE | {'out_json': str(td / 'perf.json'), 'plot_png': str(td / 'perf.png')}
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    pm.execute_notebook(str(BENCH / 'perf_suite.ipynb'), str(td / 'perf_suite.ipynb'), parameters=params, cwd=str(BENCH),
                        kernel_name='python3', progress_bar=False)
    return td, json.loads((td / 'perf.json').read_text())

def test_smoke_records(smoke):
    td, res = smoke
    cases = [r['case'] for r in res['records']]
    assert cases == ['sft_lora', 'sft_lora_threads1', 'dpo_lora', 'lever_packing', 'lever_row_packing', 'memory_4bit_lora', 'memory_none_prefix']
    for r in res['records']:
        for f in FIELDS: assert f in r, f"{r['case']}: no {f}"
        if r.get('baseline_error'):  # plain TRL cannot train prefix tuning: recorded as its error, no ratio
            assert r['case'] == 'memory_none_prefix' and r['baseline_error'].startswith('plain TRL fails: ') and r['ratio'] is None
            assert r['ours_tokens_per_s'] > 0 and r['peak_memory_bytes'] > 0
            continue
        for f in ('ours_tokens_per_s', 'baseline_tokens_per_s', 'ratio', 'mfu', 'peak_memory_bytes', 'repeats'):
            assert r[f] > 0, f"{r['case']}: {f} = {r[f]}"
        assert abs(r['ratio'] - r['ours_tokens_per_s'] / r['baseline_tokens_per_s']) < 1e-9
        assert 0 < r['mfu'] < 1
        assert {'cpu', 'cores', 'torch'} <= set(r['machine'])
    # MFU divides by the peak of the precision the runs computed in, read from this machine (fp32 where bf16 is emulated)
    from typhoon_nb.loader import cpu_has_bf16
    assert res['peak_dtype'] == ('bfloat16' if cpu_has_bf16() else 'float32') == res['machine']['compute_dtype']
    assert res['machine']['cpu_bf16'] == cpu_has_bf16()
    assert res['peak_flops_per_s'] > 0 and (td / 'perf.png').stat().st_size > 1000
    th = {r['case']: r['machine']['torch_threads'] for r in res['records'][:2]}
    assert th == {'sft_lora': 2, 'sft_lora_threads1': 1}  # the headline again at threads_compare, with that count's peak
    assert res['records'][1]['peak_flops_per_s'] != res['records'][0]['peak_flops_per_s']

def test_smoke_sides_differ_as_documented(smoke):
    """Our SFT side packs padding-free without checkpointing; plain TRL keeps its defaults (checkpointing, padding; bf16
    autocast where the CPU has bf16 hardware, fp32 where bf16 would be emulated)."""
    from typhoon_nb.loader import cpu_has_bf16
    head = smoke[1]['records'][0]
    ours = [r for r in head['runs'] if r['path'] == 'ours'][0]
    trl = [r for r in head['runs'] if r['path'] == 'trl'][0]
    assert ours['padding_free'] and not ours['gradient_checkpointing']
    assert trl['bf16'] == ours['bf16'] == cpu_has_bf16() and trl['gradient_checkpointing'] and not trl['padding_free']

def test_flops_convention():
    import gpu_perf as g, torch
    m = g.build_model('tiny', torch.float32, 'cpu')
    s = g.SHAPES['tiny']
    h, i, L, V, kv = s['hidden_size'], s['intermediate_size'], s['num_hidden_layers'], s['vocab_size'], s['num_key_value_heads']
    hd = h // s['num_attention_heads']
    n = L * (2 * h * h + 2 * h * kv * hd + 3 * h * i) + V * h  # attention, MLP, LM head; not the input embeddings
    assert g.matmul_params(m) == n
    assert g.flops_per_token(n, 'lora') == 4 * n and g.flops_per_token(n, 'full') == 6 * n

def test_typhoon_7b_shape():
    import gpu_perf as g
    from transformers import MistralConfig
    c = MistralConfig(**g.SHAPES['7b'])
    s = g.SHAPES['7b']
    hd = s['hidden_size'] // s['num_attention_heads']
    n = s['num_hidden_layers'] * (2 * s['hidden_size'] ** 2 + 2 * s['hidden_size'] * s['num_key_value_heads'] * hd
                                  + 3 * s['hidden_size'] * s['intermediate_size']) + 2 * s['vocab_size'] * s['hidden_size']
    assert 7.2e9 < n < 7.3e9  # Typhoon-7B: about 7.27 B weights in the matrices and embeddings
    assert c.num_key_value_heads == 8 and c.intermediate_size == 14336

def test_cli_tiny_qlora(tmp_path):
    "The GPU script's command line at a tiny shape on CPU: 4-bit LoRA, both paths, JSON with rates, ratio, MFU and memory."
    out = tmp_path / 'g.json'
    cp = subprocess.run([sys.executable, str(BENCH / 'gpu_perf.py'), '--shape', 'tiny', '--steps', '2', '--batch_size', '4',
                         '--max_length', '48', '--n_train', '64', '--no_install', '--out', str(out)],
                        capture_output=True, text=True, env=os.environ | {'HF_HUB_OFFLINE': '1'}, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res['quantization'] == '4bit' and res['peft'] == 'lora' and {r['path'] for r in res['runs']} == {'ours', 'trl'}
    assert res['tokens_per_s']['ours'] > 0 and res['tokens_per_s']['trl'] > 0 and res['ratio'] > 0
    assert 0 < res['mfu']['ours'] < 1 and res['peak_flops_per_s'] > 0 and res['peak_dtype'] == res['machine']['compute_dtype']
    assert all(r['peak_memory_bytes'] > 0 and r['peak_rss_bytes'] > 0 for r in res['runs'])

def test_clock_needs_steps():
    import gpu_perf as g
    c = g.Clock(warmup=1)
    c.marks = [(0.0, 100)]
    with pytest.raises(RuntimeError, match='only 1 steps ran: need more than 1 warm-up'): c.rate()
    c.marks = [(0.0, 100), (2.0, 500)]
    assert c.rate() == (200.0, 400, 2.0)

# --- FLOPs convention: each base layer counted once, adapters left out -------------------------------------------------

def _hand_count(shape:str) -> int:
    "Linear weights of the Mistral config by hand: per layer q, k, v, o, gate, up, down; plus the LM head."
    import gpu_perf as g
    s = g.SHAPES[shape]
    h, i, L, V, kv = s['hidden_size'], s['intermediate_size'], s['num_hidden_layers'], s['vocab_size'], s['num_key_value_heads']
    hd = h // s['num_attention_heads']
    q, k, v, o = h * h, h * kv * hd, h * kv * hd, h * h
    gate, up, down = h * i, h * i, i * h
    return L * (q + k + v + o + gate + up + down) + V * h

@pytest.mark.parametrize('quantization', ['none', '8bit', '4bit'])
def test_matmul_params_quantized_and_wrapped(quantization):
    """The same tiny model gives the hand count with any quantization, bare or wrapped: our LoRA, TRL's all-linear LoRA
    (PEFT's bnb wrappers are also named Linear4bit / Linear8bitLt), LoRA + prefix, LoRA with trained embedding copies."""
    import gpu_perf as g, torch
    from peft import LoraConfig, get_peft_model
    from typhoon_nb.config import RunConfig
    from typhoon_nb.loader import quantization_config, quantize_in_place
    from typhoon_nb.adapters import apply_peft
    torch.set_num_threads(1)
    n = _hand_count('tiny')
    assert n == 331776
    def base():
        m = g.build_model('tiny', torch.float32, 'cpu')
        return m if quantization == 'none' else quantize_in_place(m, quantization_config(quantization, torch.bfloat16), 'cpu')
    wraps = {'bare': lambda m: m,
             'ours lora': lambda m: apply_peft(m, RunConfig(quantization=quantization))[0],
             'trl lora': lambda m: get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules='all-linear', task_type='CAUSAL_LM')),
             'lora + prefix': lambda m: apply_peft(m, RunConfig(quantization=quantization, peft_method='both'))[0],
             'lora + embeddings': lambda m: apply_peft(m, RunConfig(quantization=quantization), train_embeddings=True)[0]}
    for name, wrap in wraps.items():
        m = wrap(base())
        if name != 'bare':  # the wrapped model does carry the adapter matrices and base layers the old count took twice
            assert any('lora_A' in k for k, _ in m.named_modules()), name
        assert g.matmul_params(m) == n, f"{quantization} {name}: {g.matmul_params(m)} != {n}"
        if quantization != 'none' and name == 'trl lora':
            assert sum(type(x).__name__ in ('Linear4bit', 'Linear8bitLt') for x in m.modules()) == 2 * 7 * g.SHAPES['tiny']['num_hidden_layers']

def test_matmul_params_7b_on_meta():
    "Typhoon-7B's shape, built on the meta device (no memory): N = 7,123,578,880 = the hand count."
    import gpu_perf as g, torch
    m = g.build_model('7b', torch.bfloat16, 'meta')
    assert g.matmul_params(m) == _hand_count('7b') == 7_123_578_880

# --- peak RSS of a child process --------------------------------------------------------------------------------------

PARENT = r'''
import json, resource, subprocess, sys
sys.path.insert(0, sys.argv[1])
import gpu_perf as g
big = bytearray(b'\x01') * (300 << 20)  # 300 MiB, every page written
child = subprocess.run([sys.executable, '-c', "import json, resource, sys; sys.path.insert(0, sys.argv[1]); import gpu_perf as g; "
                        "print(json.dumps({'peak': g.peak_rss(), 'ru_maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))",
                        sys.argv[1]], capture_output=True, text=True, check=True)
print(json.dumps({'parent': g.peak_rss(), 'child': json.loads(child.stdout)}))
'''

def test_peak_rss_child_reports_its_own_peak():
    "A child of a process that touched 300 MiB reports its own high-water mark; ru_maxrss would report the parent's."
    cp = subprocess.run([sys.executable, '-c', PARENT, str(BENCH)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    r = json.loads(cp.stdout)
    parent, child = r['parent'], r['child']
    assert parent > 300 << 20
    assert child['peak'] < parent - (200 << 20), r
    assert child['ru_maxrss'] > parent - (50 << 20), r  # the old measure: the parent's peak, inherited across fork + exec

# --- the offline bundle -----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    import gpu_bundle as b
    d = tmp_path_factory.mktemp('gpu')
    info = b.make_bundle(d, wheels=False)
    return d, info

def test_bundle_contents(bundle):
    import gpu_perf as g, gpu_bundle as b
    from typhoon_nb.config import StageConfig
    from typhoon_nb.data import load_stage_data
    d, info = bundle
    assert info['records'] == {'sft': 2000, 'dpo': 1000} and info['wheels'] == []
    assert (d / 'tokenizer' / 'tokenizer.json').exists() and json.loads((d / 'bundle.json').read_text())['records'] == info['records']
    for kind in ('sft', 'dpo'):  # the JSONL files read through the data layer give the demo split
        lines = (d / f'{kind}.jsonl').read_text().splitlines()
        assert len(lines) == info['records'][kind]
        demo = load_stage_data(StageConfig(kind=kind, data=f'demo:{kind}'), seed=g.DATA_SEED).train.to_list()
        assert load_stage_data(StageConfig(kind=kind, data=str(d / f'{kind}.jsonl')), seed=g.DATA_SEED).train.to_list() == demo
        assert json.loads(lines[0]) == demo[0] and set(demo[0]) == ({'prompt', 'completion'} if kind == 'sft' else {'prompt', 'chosen', 'rejected'})
    tok, saved = g.tokenizer(), g.tokenizer(d / 'tokenizer')
    assert saved.get_vocab() == tok.get_vocab() and saved.chat_template == tok.chat_template
    assert (saved.pad_token_id, saved.eos_token_id) == (tok.pad_token_id, tok.eos_token_id) == (1, 0)
    # what the measurement trains on is the same either way (validated at max_length 96, first 300 records)
    for kind in ('sft', 'dpo'):
        a = g.load_data(kind, tok, 96, 300).to_list()
        assert g.load_data(kind, saved, 96, 300, data_dir=d).to_list() == a and len(a) == 300
    run = (d / 'run.sh').read_text()
    assert b.PIP_INSTALL in run and 'export PYTHONPATH=/tmp/site:$PWD' in run and 'nvidia-smi' in run
    assert 'gpu_perf.py --no_install --tokenizer .gpu/tokenizer --data_dir .gpu "$@"' in run and 'pip show' in run
    assert '[ $# -eq 0 ] && set -- --suite side_by_side' in run  # no arguments: the side-by-side suite
    assert b.PIP_INSTALL_UNSLOTH in run and 'export GPU_PERF_UNSLOTH_PYTHONPATH=/tmp/site_unsloth:$PWD' in run
    assert all(f'.gpu/wheels/{n}-*.whl' in b.PIP_INSTALL_UNSLOTH for n in ('bitsandbytes', 'peft', 'dill', 'multiprocess'))
    assert subprocess.run(['bash', '-n', str(d / 'run.sh')]).returncode == 0 and os.access(d / 'run.sh', os.X_OK)

def _wheels_here():
    "The repository's .whl folder with the bundle's wheels (Unsloth's too), downloaded from PyPI (pip download) where missing."
    import gpu_bundle as b, tempfile
    src = b.ROOT / '.whl'
    for table in (b.WHEELS, b.UNSLOTH_WHEELS):
        if any(b.find_wheel(src, n, v) is None for n, v in table.items()):
            try:
                with tempfile.TemporaryDirectory() as td: b.copy_wheels(Path(td), src, download=True, table=table)
            except (subprocess.CalledProcessError, FileNotFoundError) as e: pytest.skip(f'{src}: the wheels could not be downloaded ({e})')
    return src

def test_bundle_wheels(bundle, tmp_path):
    """The 7 wheels and nothing else (pythainlp, tokenizers, huggingface_hub stay behind), and Unsloth's 5 in wheels/unsloth;
    as the bundle makes them (bitsandbytes and unsloth slimmed), with the repository under 60 MiB."""
    import gpu_bundle as b
    ws = b.copy_wheels(tmp_path / 'wheels', _wheels_here(), slim_bnb=True)
    names = sorted(w.name.split('-')[0] for w in ws)
    assert names == sorted(b.WHEELS) == ['bitsandbytes', 'datasets', 'dill', 'multiprocess', 'peft', 'transformers', 'trl']
    assert all(f"-{b.WHEELS[w.name.split('-')[0]]}-" in w.name for w in ws)
    assert sorted(p.name for p in (tmp_path / 'wheels').iterdir()) == sorted(w.name for w in ws)
    ws = b.copy_wheels(tmp_path / 'wheels' / 'unsloth', _wheels_here(), table=b.UNSLOTH_WHEELS)  # Unsloth's, as make_bundle puts them
    assert sorted(w.name.split('-')[0] for w in ws) == sorted(b.UNSLOTH_WHEELS) == ['cut_cross_entropy', 'datasets', 'trl', 'unsloth', 'unsloth_zoo']
    assert all(f"-{b.UNSLOTH_WHEELS[w.name.split('-')[0]]}-" in w.name for w in ws)
    total = b.tree_bytes(tmp_path / 'wheels') + bundle[1]['total_bytes'] + b.tracked_bytes()  # + tokenizer, data, run.sh; the repository
    assert total < 60 * 2**20, f'{total / 2**20:.1f} MiB carried: over what a device call carries'

def test_slim_bitsandbytes_wheel_installs(tmp_path):
    "The slimmed bitsandbytes wheel keeps the CPU and CUDA 13.x libraries, installs with pip --no-deps, and imports."
    import gpu_bundle as b, zipfile
    w = b.slim_wheel(b.find_wheel(_wheels_here(), 'bitsandbytes', b.WHEELS['bitsandbytes']), tmp_path)
    libs = sorted(n.split('/')[-1] for n in zipfile.ZipFile(w).namelist() if n.endswith('.so'))
    assert libs == ['libbitsandbytes_cpu.so', 'libbitsandbytes_cuda130.so', 'libbitsandbytes_cuda132.so']
    assert w.stat().st_size < 8 * 2**20
    site = tmp_path / 'site'
    cp = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--target', str(site),
                         '--python-version', '3.12', '--only-binary=:all:', str(w)], capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert sorted(p.name for p in (site / 'bitsandbytes').glob('*.so')) == libs
    cp = subprocess.run([sys.executable, '-c', 'import bitsandbytes as b, bitsandbytes.nn; print(b.__file__, b.__version__)'],
                        capture_output=True, text=True, timeout=120, env=os.environ | {'PYTHONPATH': str(site)}, cwd=tmp_path)
    assert cp.returncode == 0 and cp.stdout.split() == [str(site / 'bitsandbytes' / '__init__.py'), b.WHEELS['bitsandbytes']], cp.stderr[-2000:]

HIDDEN = ('ipywidgets', 'papermill', 'nbdev', 'pythainlp', 'matplotlib')
HIDING_RUN = r'''
import runpy, sys
HIDE = set(sys.argv[1].split(','))
class Hide:  # these packages are not installed, as far as this process can tell: import raises ModuleNotFoundError
    def __init__(self, inner): self.inner = inner
    def find_spec(self, name, path=None, target=None):
        return None if name.partition('.')[0] in HIDE else self.inner.find_spec(name, path, target)
    def __getattr__(self, k): return getattr(self.inner, k)
sys.meta_path[:] = [Hide(f) if hasattr(f, 'find_spec') else f for f in sys.meta_path]
try: import pythainlp
except ImportError: pass
else: raise SystemExit('hiding failed')
script = sys.argv[2]; sys.argv = sys.argv[2:]
runpy.run_path(script, run_name='__main__')
print('HIDDEN LOADED', sorted(n for n in sys.modules if n.partition('.')[0] in HIDE))
'''

def test_cli_bundle_needs_no_notebook_packages(bundle, tmp_path):
    """The GPU run as run.sh starts it (--no_install, the bundle's tokenizer and data), at the tiny shape on CPU, with
    ipywidgets, papermill, nbdev, pythainlp and matplotlib unimportable and an empty tiny-Typhoon cache: it completes."""
    d, _ = bundle
    out = tmp_path / 'g.json'
    env = os.environ | {'HF_HUB_OFFLINE': '1', 'TYPHOON_NB_CACHE': str(tmp_path / 'empty_cache'), 'OMP_NUM_THREADS': '1'}
    env.pop('OUT', None)
    cp = subprocess.run([sys.executable, '-c', HIDING_RUN, ','.join(HIDDEN), str(BENCH / 'gpu_perf.py'), '--shape', 'tiny',
                         '--steps', '2', '--batch_size', '4', '--max_length', '48', '--n_train', '64', '--threads', '1',
                         '--no_install', '--tokenizer', str(d / 'tokenizer'), '--data_dir', str(d), '--out', str(out)],
                        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert cp.returncode == 0, cp.stderr[-3000:]
    assert 'HIDDEN LOADED []' in cp.stdout
    assert not (tmp_path / 'empty_cache').exists()  # the tiny Typhoon was not built
    res = json.loads(out.read_text())
    assert res['complete'] and [r['path'] for r in res['runs']] == ['ours', 'trl'] and res['installed'] == []
    assert res['tokens_per_s']['ours'] > 0 and res['tokens_per_s']['trl'] > 0 and 0 < res['mfu']['ours'] < 1
    assert res['runs'][0]['matmul_params'] == res['runs'][1]['matmul_params'] == _hand_count('tiny')
    assert res['versions']['transformers'] and res['data_dir'] == str(d)
    import re  # timestamped progress: the model build, every step, the file written after each path
    stamp = r'\[\d\d:\d\d:\d\d \+\s*\d+\.\d s\] '
    for what in ('ours: building the tiny model', 'trl: quantizing to 4bit', '  step 2: ', r'wrote .*g\.json \(1 run\(s\)\)'):
        assert re.search(stamp + what, cp.stdout), what

def _tiny_main(g, out, *extra):
    "gpu_perf.main at the tiny shape, 2 steps, no installs, no peak, one thread; results to `out`."
    return g.main(['--shape', 'tiny', '--steps', '2', '--batch_size', '4', '--max_length', '48', '--n_train', '32', '--no_install',
                   '--no_peak', '--quiet', '--threads', '1', '--out', str(out), *extra])

def _failing(g, monkeypatch, bad:str, exc:BaseException):
    "Make gpu_perf.measure raise `exc` for the path `bad` (the other path measures as usual)."
    real = g.measure
    def measure(path, *a, **k):
        if path == bad: raise exc
        return real(path, *a, **k)
    monkeypatch.setattr(g, 'measure', measure)

def test_results_written_after_each_path(tmp_path, monkeypatch):
    "A run stopped in its second path leaves the first path's results on disk (complete: false)."
    import gpu_perf as g
    out = tmp_path / 'r.json'
    _failing(g, monkeypatch, 'trl', KeyboardInterrupt('killed'))
    with pytest.raises(KeyboardInterrupt, match='killed'):
        _tiny_main(g, out)
    res = json.loads(out.read_text())
    assert res['complete'] is False and [r['path'] for r in res['runs']] == ['ours'] and res['tokens_per_s']['ours'] > 0

def test_a_failing_path_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """An out-of-memory error in one path is written as that run's `fits: false` with the error's first line; another
    error as `failed`; the other path's numbers stay."""
    import gpu_perf as g
    out = tmp_path / 'r.json'
    _failing(g, monkeypatch, 'ours', RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail'))
    _tiny_main(g, out)
    res = json.loads(out.read_text())
    assert res['complete'] is True and res['runs'][0] == {'path': 'ours', 'memory_cap_gb': None, 'kind': 'sft', 'status': 'oom', 'fits': False,
                                                          'error': 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB'}
    assert list(res['tokens_per_s']) == ['trl'] and 'ratio' not in res
    assert [(r['path'], r['status'], r['fits']) for r in res['table']] == [('ours', 'oom', False), ('trl', 'ok', True)]
    _failing(g, monkeypatch, 'trl', ValueError('bad settings'))
    _tiny_main(g, out, '--paths', 'trl')
    assert json.loads(out.read_text())['runs'][0] == {'path': 'trl', 'memory_cap_gb': None, 'kind': 'sft', 'status': 'failed', 'fits': None,
                                                           'error': 'ValueError: bad settings'}

def test_out_defaults_under_OUT(monkeypatch, tmp_path):
    import gpu_perf as g
    monkeypatch.setenv('OUT', str(tmp_path))
    assert g._cli([]).out == str(tmp_path / 'gpu_perf.json')
    monkeypatch.delenv('OUT')
    assert g._cli([]).out == 'gpu_perf.json'

def test_ours_trainer_speedups_can_be_left_out(tmp_path):
    "The levers `row_packing` and `fast_lora` measure our trainer without each speed-up: TRL's collator, torch's dropout."
    import gpu_perf as g, torch
    from typhoon_nb.refinements import RowPackedCollator
    from typhoon_nb.adapters import FastDropout
    tok = g.tokenizer(); data = g.load_data('sft', tok, 48, 32)
    kinds = lambda tr: (type(tr.data_collator).__name__, {type(m).__name__ for n, m in tr.model.named_modules() if n.endswith('lora_dropout.default')})
    mk = lambda **kw: g.ours_trainer('sft', 'tiny', 'none', 'lora', 1, 4, 48, data, tok, g.Clock(), 'cpu', str(tmp_path), **kw)
    assert kinds(mk()) == ('RowPackedCollator', {'FastDropout'})
    assert kinds(mk(off=('row_packing',))) == ('DataCollatorForLanguageModeling', {'FastDropout'})
    assert kinds(mk(off=('fast_lora',))) == ('RowPackedCollator', {'Dropout'})
    with pytest.raises(ValueError, match='unknown speed-up'): mk(off=('warp',))

def test_cli_ours_checkpointing(tmp_path):
    "--ours_checkpointing measures our path with gradient checkpointing on (the memory side of the trade)."
    import gpu_perf as g
    out = tmp_path / 'r.json'
    _tiny_main(g, out, '--paths', 'ours', '--ours_checkpointing')
    runs = json.loads(out.read_text())['runs']
    assert [(r['path'], r['gradient_checkpointing']) for r in runs] == [('ours', True)]
