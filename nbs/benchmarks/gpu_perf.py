"""Training throughput of our SFT / DPO path against plain TRL defaults, one configuration per call.

The measuring engine of `perf_suite.ipynb` (CPU) and, run as a script on a machine with one H100-class GPU, the QLoRA
check at Typhoon-7B's full shape:

    python nbs/benchmarks/gpu_perf.py --out gpu_perf.json            # 7b shape, 4bit, lora, ours vs TRL, < 10 min

On a GPU machine without network, `nbs/benchmarks/gpu_bundle.py` prepares `.gpu/` (wheels, the tokenizer, the demo
data as JSONL, `run.sh`) and `bash .gpu/run.sh` runs this script with `--no_install --tokenizer .gpu/tokenizer
--data_dir .gpu`: then neither pythainlp nor the embedded tiny Typhoon build is needed. The script prints timestamped
progress lines and rewrites its JSON after each path, so a run cut short keeps what it measured (`--out` defaults to
`$OUT/gpu_perf.json` where `$OUT` is set).

Every model is built from a config with random weights (nothing is downloaded). Tokens are the non-padding tokens the
trainer consumed (`include_num_input_tokens_seen='non_padding'`), counted after the warm-up steps. FLOPs convention:
6 N per token for full training, 4 N for adapters over a frozen base (forward 2 N, backward through the activations
2 N, no weight gradients), N = parameters of the matrix multiplications of the base model (all linear layers and the LM
head at their logical size, quantized or not; not the input embedding table, not the adapters' own small matrices);
attention's sequence-length term is left out (short sequences here). Memory: on GPU the CUDA peak allocated while
training (the model build before it is reported apart), on CPU the largest RSS seen at a step end; `peak_rss_bytes`
is the process's own high-water mark (VmHWM).
"""
from __future__ import annotations
import argparse, importlib, importlib.util, json, os, platform, resource, subprocess, sys, tempfile, threading, time
from pathlib import Path

PROGRESS = False  # print timestamped progress lines (the command line turns it on)
_T0 = time.perf_counter()

def say(msg:str):
    "A timestamped progress line (wall clock and seconds since the start), flushed at once; silent unless `PROGRESS`."
    if PROGRESS: print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)

NEEDS = {'torch': 'torch', 'transformers': 'transformers>=5', 'peft': 'peft', 'trl': 'trl>=1.0',
         'bitsandbytes': 'bitsandbytes>=0.48', 'datasets': 'datasets', 'accelerate': 'accelerate', 'pythainlp': 'pythainlp'}
BUNDLED = ('pythainlp',)  # needed only to build the tokenizer and the demo data; a bundle brings both

def ensure_packages(needs:dict=NEEDS, install:bool=True) -> list[str]:
    "Import each package; pip-install the missing ones (and the repository itself) when `install`; return what was installed."
    missing = [spec for mod, spec in needs.items() if importlib.util.find_spec(mod) is None]
    try: import typhoon_nb  # noqa: F401
    except ImportError: missing.append(str(Path(__file__).resolve().parents[2]))  # the repository, editable
    if missing and install:
        args = [a for spec in missing for a in (['-e', spec] if os.path.isdir(spec) else [spec])]
        subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', *args], check=True)
    return missing

TYPHOON_7B = dict(vocab_size=35219, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=32768, sliding_window=4096)  # scb10x/typhoon-7b's config.json
SHAPES = {'7b': TYPHOON_7B,  # Typhoon-7B's full shape
          '30m': dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=512, sliding_window=256),  # ~28M parameters, the tiny Typhoon's vocabulary
          'tiny': dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, max_position_embeddings=256, sliding_window=128)}  # for tests

def device() -> str:
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'

def machine() -> dict:
    "CPU model, cores, torch version (and the GPU where there is one)."
    import torch
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: pass
    from typhoon_nb.loader import cpu_flags, cpu_has_bf16
    fl = cpu_flags()
    m = {'cpu': cpu, 'cores': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'torch': torch.__version__,
         'cpu_bf16': cpu_has_bf16(fl), 'cpu_flags': sorted(f for f in fl if f.startswith(('avx', 'amx'))),
         'compute_dtype': run_dtype()}
    if torch.cuda.is_available(): m |= {'gpu': torch.cuda.get_device_name(0), 'cuda': torch.version.cuda}
    return m

def versions(names=('transformers', 'trl', 'peft', 'bitsandbytes', 'accelerate', 'datasets', 'tokenizers', 'huggingface_hub')) -> dict:
    "Installed versions of the training packages (None where missing)."
    from importlib.metadata import version, PackageNotFoundError
    out = {}
    for n in names:
        try: out[n] = version(n)
        except PackageNotFoundError: out[n] = None
    return out

def run_dtype(dev:str|None=None) -> str:
    """The dtype our path computes in on `dev` (torch's name), as `precision: auto` picks it: bf16 on a GPU with bf16 and
    on a CPU with bf16 hardware (AVX512-BF16 or AMX), fp16 on a GPU without, fp32 on a CPU without (where bf16 is emulated,
    many times slower). Read from the machine at run time (`TYPHOON_NB_CPU_BF16=0` forces the CPU fallback)."""
    from typhoon_nb.loader import resolve_precision
    return str(resolve_precision('auto', dev or device())[0]).split('.')[-1]

PEAK_SIZES = {'tiny': (256, 512)}  # square matmul sizes of the peak per shape: small for the smoke runs; the others (1024, 2048)

def matmul_peak(dtype:str|None=None, sizes=(1024, 2048), reps:int=5, dev:str|None=None) -> dict:
    """Best FLOP/s of square matmuls in `dtype` (default: `run_dtype`, the precision the run computes in) over `sizes`
    (median of `reps` per size): the peak that MFU divides by."""
    import torch
    dev = dev or device()
    dtype = dtype or run_dtype(dev)
    dt = getattr(torch, dtype)
    if dev == 'cuda': sizes = tuple(s * 4 for s in sizes)
    per = {}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dt, device=dev), torch.randn(n, n, dtype=dt, device=dev)
        for _ in range(2): a @ b
        ts = []
        for _ in range(reps):
            if dev == 'cuda': torch.cuda.synchronize()
            t = time.perf_counter(); a @ b
            if dev == 'cuda': torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        per[n] = 2 * n ** 3 / sorted(ts)[len(ts) // 2]
    return {'dtype': dtype, 'flops_per_s': max(per.values()), 'by_size': per, 'device': dev}

def _adapter_module_ids(model) -> set:
    "ids of the modules that belong to adapters: PEFT tuner layers' own layers (`lora_A`, `lora_B`, `modules_to_save` copies, ...) and prompt encoders."
    import torch
    ids = set()
    for m in model.modules():
        parts = [getattr(m, a, None) for a in getattr(m, 'adapter_layer_names', ())] + [getattr(m, 'prompt_encoder', None)]
        for p in parts:
            if isinstance(p, torch.nn.Module): ids |= {id(x) for x in p.modules()}
    return ids

def _base_linear_types() -> tuple:
    "torch's Linear and, where bitsandbytes is loaded, its quantized layers (not PEFT's LoRA wrappers of the same names)."
    import torch
    bnb = sys.modules.get('bitsandbytes')
    return (torch.nn.Linear,) + ((bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ())

def matmul_params(model) -> int:
    """N of the FLOPs convention: weights of the base model's linear layers and LM head, quantized ones at their logical
    size (in x out). A layer counts once however it is wrapped: PEFT's LoRA wrappers (`peft.tuners.lora.bnb.Linear4bit`
    and `Linear8bitLt` share the bitsandbytes names and carry `in_features`) hold the real layer as `base_layer` and are
    skipped. Adapters are left out (LoRA's `lora_A` / `lora_B`, trained copies in `modules_to_save`, prefix encoders):
    LoRA r = 16 on every linear layer of the blocks would add 4.6% to N at the 30M shape and 0.6% at 7b, and the
    convention measures the base model's work."""
    types, skip, n = _base_linear_types(), _adapter_module_ids(model), 0
    for m in model.modules():
        if id(m) in skip or hasattr(m, 'base_layer') or not isinstance(m, types): continue
        n += (m.in_features * m.out_features) or m.weight.numel()
    return n

def flops_per_token(n_matmul:int, peft:str) -> int:
    "Model FLOPs per trained token: 6 N (full) or 4 N (adapters over a frozen base)."
    return (6 if peft == 'full' else 4) * n_matmul

def build_model(shape:str, dtype, dev:str, seed:int=0, pad_token_id:int=1, eos_token_id:int=0):
    "A random-init Mistral model of `shape` in `dtype` on `dev` (a 7B model is created straight in bf16 on the device)."
    import torch
    from transformers import MistralConfig, MistralForCausalLM
    conf = MistralConfig(**SHAPES[shape], rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                         pad_token_id=pad_token_id, bos_token_id=eos_token_id, eos_token_id=eos_token_id)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype(); torch.set_default_dtype(dtype)
    try:
        with torch.device(dev): model = MistralForCausalLM(conf)
    finally: torch.set_default_dtype(prev)
    return model

class _ClockBase:
    "Time and non-padding tokens at each optimizer step end (after the GPU finished), and the peak RSS seen (CPU)."
    def __init__(self, warmup:int=1): self.warmup, self.marks, self.rss = warmup, [], 0
    def on_step_end(self, args, state, control, **kw):
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized(): torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), state.num_input_tokens_seen))
        self.rss = max(self.rss, rss_now())
        if len(self.marks) > 1:
            (t0, n0), (t1, n1) = self.marks[-2:]
            say(f"  step {state.global_step}: {n1 - n0} tokens in {t1 - t0:.2f} s")
        else: say(f"  step {state.global_step} (warm-up): {self.marks[0][1]} tokens")
    def rate(self) -> tuple[float, int, float]:
        "(tokens/s, tokens, seconds) over the steps after the warm-up."
        if len(self.marks) <= self.warmup: raise RuntimeError(f"only {len(self.marks)} steps ran: need more than {self.warmup} warm-up step(s)")
        (t0, n0), (t1, n1) = self.marks[self.warmup - 1], self.marks[-1]
        return (n1 - n0) / (t1 - t0), n1 - n0, t1 - t0

def Clock(warmup:int=1):
    "A trainer callback that clocks the optimizer steps (see `_ClockBase`)."
    from transformers import TrainerCallback
    class _Clock(_ClockBase, TrainerCallback): pass
    return _Clock(warmup)

def rss_now() -> int:
    "Resident set size of this process now, bytes."
    try: return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except Exception: return 0

def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes: `VmHWM` of /proc/self/status, which belongs to the address
    space and starts afresh at exec. (Linux carries `ru_maxrss` across fork + exec, so a child of a big process, such as
    a 2.5 GiB notebook kernel, would report its parent's peak.) `ru_maxrss` where /proc is missing."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'): return int(line.split()[1]) * 1024
    except OSError: pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin' else 1024)

DATA_SEED = 42  # the demo curriculum's seed of every measurement

def load_data(kind:str, tok, max_length:int, n:int|None=None, seed:int=DATA_SEED, data_dir=None):
    """The demo curriculum's training split for `kind` (sft | dpo), validated by the data layer (its first `n` records).
    With `data_dir`: the records of `data_dir/<kind>.jsonl` (written by `gpu_bundle.py` from the same split), validated
    the same way except for the Thai normalisation, which they already went through (it would need pythainlp)."""
    if data_dir is None:
        from typhoon_nb.config import StageConfig
        from typhoon_nb.data import load_stage_data
        ds = load_stage_data(StageConfig(kind=kind, data=f'demo:{kind}', max_length=max_length), seed=seed, tokenizer=tok).train
    else:
        from typhoon_nb.data import load_records
        ds, _ = load_records(Path(data_dir) / f'{kind}.jsonl', kind, tokenizer=tok, max_length=max_length, normalize=False)
    return ds.select(range(min(n, len(ds)))) if n else ds

def tokenizer(path=None):
    "The tiny Typhoon's tokenizer after `prepare_tokenizer` (pad token, chat template), or the one saved in `path`."
    from transformers import AutoTokenizer
    from typhoon_nb.loader import prepare_tokenizer
    if path is None:
        from typhoon_nb.loader import tiny_typhoon
        path = tiny_typhoon('tiny')
    tok = AutoTokenizer.from_pretrained(str(path)); prepare_tokenizer(tok)
    return tok

def _quiet(trainer):
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for c in (PrinterCallback, ProgressCallback): trainer.remove_callback(c)
    return trainer

def ours_trainer(kind:str, shape:str, quantization:str, peft:str, steps:int, batch_size:int, max_length:int, data, tok,
                 clock, dev:str, out_dir:str, precision:str='auto', lr:float=2e-4, args:dict|None=None, off:tuple=(), **overrides):
    """Our path: the loader's precision and quantization, `apply_peft`, and the trainer `typhoon_nb.stages.build_trainer` builds.
    `off` names speed-ups of that trainer to leave out, for measuring them: `row_packing` (TRL's one-row padding-free
    batches instead), `fast_lora` (torch's dropout and PEFT's input casts)."""
    import contextlib
    from unittest import mock
    import typhoon_nb.refinements as refinements, typhoon_nb.adapters as adapters
    from typhoon_nb.config import RunConfig, StageConfig
    from typhoon_nb.loader import resolve_precision, quantization_config, quantize_in_place
    from typhoon_nb.adapters import apply_peft
    from typhoon_nb.stages import build_trainer
    stage = StageConfig(kind=kind, data=f'demo:{kind}', batch_size=batch_size, max_length=max_length, max_steps=steps, save_steps=0,
                        eval_samples=0, lr=lr, reference='entering')
    cfg = RunConfig(quantization=quantization, peft_method=peft, precision=precision, stages=[stage], **overrides).validate()
    dtype, _ = resolve_precision(cfg.precision, dev)
    say(f"ours: building the {shape} model in {str(dtype).split('.')[-1]} on {dev}")
    model = build_model(shape, dtype, dev, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if quantization != 'none':
        say(f"ours: quantizing to {quantization}")
        model.config.quantization_config = quantization_config(quantization, dtype)  # as the loader's from_pretrained leaves it
        quantize_in_place(model, model.config.quantization_config, dev)
    say(f"ours: adding {peft} adapters and building the trainer")
    model, _ = apply_peft(model, cfg)
    unknown = set(off) - {'row_packing', 'fast_lora'}
    if unknown: raise ValueError(f"off: unknown speed-up(s) {sorted(unknown)}; known: row_packing, fast_lora")
    with contextlib.ExitStack() as stack:
        if 'row_packing' in off: stack.enter_context(mock.patch.object(refinements, 'row_packing', lambda tr: False))
        if 'fast_lora' in off: stack.enter_context(mock.patch.object(adapters, 'fast_lora_cpu', lambda tr: {}))
        tr = build_trainer(cfg, stage, model, tok, data, out_dir, [clock], progress=False)
    tr.args.include_num_input_tokens_seen = 'non_padding'
    for k, v in (args or {}).items(): setattr(tr.args, k, v)  # settings read when training starts (dataloader)
    return _quiet(tr)

def trl_trainer(kind:str, shape:str, quantization:str, peft:str, steps:int, batch_size:int, max_length:int, data, tok,
                clock, dev:str, out_dir:str, lr:float=2e-4, padding_free:bool=False, **args):
    """Plain TRL: `SFTConfig()` / `DPOConfig()` defaults (bf16, gradient checkpointing, no packing), the model in its
    checkpoint dtype (fp32 at the small shapes, bf16 at 7b), the adapter through `peft_config`; only the step count, batch,
    learning rate, logging and `use_cpu` (needed on a CPU) are set, plus `args`. On a CPU without bf16 hardware, bf16
    autocast and the 4-bit compute dtype are turned off (fp32), as our path's `precision: auto` does there: emulated bf16
    would measure the emulation, not TRL."""
    import torch
    from peft import LoraConfig, PrefixTuningConfig
    from typhoon_nb.config import RunConfig
    from typhoon_nb.loader import quantization_config, quantize_in_place
    dtype = torch.bfloat16 if shape == '7b' else torch.float32
    say(f"trl: building the {shape} model in {str(dtype).split('.')[-1]} on {dev}")
    model = build_model(shape, dtype, dev, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if quantization != 'none':
        say(f"trl: quantizing to {quantization}")
        quantize_in_place(model, quantization_config(quantization, getattr(torch, run_dtype(dev)) if dev == 'cpu' else torch.bfloat16), dev)
    say(f"trl: building the trainer ({peft} through peft_config)")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear', task_type='CAUSAL_LM')
    peft_config = {'lora': lora, 'prefix': PrefixTuningConfig(num_virtual_tokens=16, task_type='CAUSAL_LM')}.get(peft)
    if peft == 'both':  # one peft_config cannot say LoRA + prefix: the model comes wrapped as our adapters build it
        from typhoon_nb.adapters import apply_peft
        model, _ = apply_peft(model, RunConfig(quantization=quantization, peft_method='both'))
    kw = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, report_to=[],
              save_strategy='no', logging_steps=1, disable_tqdm=True, include_num_input_tokens_seen='non_padding',
              use_cpu=dev == 'cpu') | ({'bf16': False} if dev == 'cpu' and run_dtype(dev) != 'bfloat16' else {}) | args
    if padding_free: kw |= dict(padding_free=True, max_length=None)  # TRL's rule; the data layer checked every record fits
    if kind == 'sft':
        from trl import SFTConfig, SFTTrainer
        return _quiet(SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=data, processing_class=tok,
                                 peft_config=peft_config, callbacks=[clock]))
    from trl import DPOConfig, DPOTrainer
    return _quiet(DPOTrainer(model=model, args=DPOConfig(**kw), train_dataset=data, processing_class=tok,
                             peft_config=peft_config, callbacks=[clock]))

def _free(dev:str):
    "Collect garbage and give cached GPU memory back (between two models)."
    import gc, torch
    gc.collect()
    if dev == 'cuda': torch.cuda.empty_cache()

def measure(path:str, kind:str='sft', shape:str='30m', quantization:str='none', peft:str='lora', steps:int=6,
            batch_size:int=16, max_length:int=96, data=None, tok=None, warmup:int=1, **kw) -> dict:
    """Build `path`'s trainer (ours | trl) for one configuration, train `steps` steps; tokens/s after `warmup` steps, memory,
    FLOPs. The model is freed before returning (the next path builds its own)."""
    import torch
    dev = device()
    tok = tok or tokenizer()
    data = data if data is not None else load_data(kind, tok, max_length)
    clock = Clock(warmup)
    if dev == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as td:
        make = ours_trainer if path == 'ours' else trl_trainer
        t0, note = time.perf_counter(), None  # note: set where a run needed a change
        tr = make(kind, shape, quantization, peft, steps, batch_size, max_length, data, tok, clock, dev, td, **kw)
        setup = time.perf_counter() - t0
        n_matmul = matmul_params(tr.model)
        mem = {}
        if dev == 'cuda':  # the build's peak (a bf16 model before quantization) apart from training's
            mem = {'setup_peak_memory_bytes': torch.cuda.max_memory_allocated()}
            torch.cuda.reset_peak_memory_stats()
        say(f"{path}: trainer ready after {setup:.1f} s; training {steps} steps of {batch_size} x {max_length}")
        out = tr.train()
        rate, tokens, secs = clock.rate()
        if dev == 'cuda': mem |= {'cuda_max_reserved_bytes': torch.cuda.max_memory_reserved()}
        res = {'path': path, 'kind': kind, 'shape': shape, 'quantization': quantization, 'peft': peft, 'steps': tr.state.global_step,
               'tokens_per_s': rate, 'tokens': tokens, 'seconds': secs, 'setup_seconds': setup, 'loss': out.training_loss,
               'matmul_params': n_matmul, 'flops_per_token': flops_per_token(n_matmul, peft),
               'bf16': bool(tr.args.bf16), 'gradient_checkpointing': bool(tr.args.gradient_checkpointing),
               'padding_free': bool(getattr(tr.args, 'padding_free', False) or getattr(tr.args, 'packing', False)),
               'peak_memory_bytes': torch.cuda.max_memory_allocated() if dev == 'cuda' else clock.rss,
               'memory_kind': 'cuda_max_allocated_training' if dev == 'cuda' else 'rss_seen_during_training', 'note': note} | mem
        del tr
        _free(dev)
    if dev == 'cuda': res['cuda_allocated_after_free_bytes'] = torch.cuda.memory_allocated()
    say(f"{path}: {rate:,.0f} tokens/s ({tokens} tokens in {secs:.2f} s), peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB"
        + (f", {res['cuda_allocated_after_free_bytes'] / 2**20:.0f} MiB still allocated after freeing" if dev == 'cuda' else ''))
    return res

def _cli(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--shape', default='7b', choices=list(SHAPES))
    ap.add_argument('--kind', default='sft', choices=('sft', 'dpo'))
    ap.add_argument('--quantization', default='4bit', choices=('4bit', '8bit', 'none'))
    ap.add_argument('--peft', default='lora', choices=('lora', 'prefix', 'both'))
    ap.add_argument('--paths', default='ours,trl', help='comma-separated: ours, trl (run alternately)')
    ap.add_argument('--repeats', type=int, default=1)
    ap.add_argument('--steps', type=int, default=None, help='optimizer steps per measurement (default: 6, or 4 at 7b)')
    ap.add_argument('--batch_size', type=int, default=None, help='sequences per step (default: 16, or 4 at 7b)')
    ap.add_argument('--max_length', type=int, default=None, help='tokens per sequence / packed block (default: 96, or 1024 at 7b)')
    ap.add_argument('--n_train', type=int, default=None, help='use the first N demo records (default: all)')
    ap.add_argument('--tokenizer', default=None, help="a saved tokenizer's folder (default: the embedded tiny Typhoon's, built on first use)")
    ap.add_argument('--data_dir', default=None, help='a folder with sft.jsonl / dpo.jsonl (default: the demo curriculum, which needs pythainlp)')
    ap.add_argument('--no_install', action='store_true', help='do not pip-install missing packages')
    ap.add_argument('--no_peak', action='store_true', help='skip the matmul peak (no MFU)')
    ap.add_argument('--peak_sizes', default=None, help='comma-separated square sizes of the matmul peak (default: 256,512 at tiny, else 1024,2048)')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    ap.add_argument('--ours_checkpointing', action='store_true', help='our path with gradient checkpointing on (memory against speed)')
    ap.add_argument('--quiet', action='store_true', help='no progress lines')
    ap.add_argument('--out', default=str(Path(os.environ['OUT']) / 'gpu_perf.json') if os.environ.get('OUT') else 'gpu_perf.json',
                    help='results JSON, rewritten after each path (default: $OUT/gpu_perf.json where $OUT is set)')
    return ap.parse_args(argv)

def summarize(a, runs:list, paths:list, steps:int, bs:int, L:int, installed:list, peak:dict|None, done:bool) -> dict:
    "The results record of the runs so far: medians per path, the ratio, MFU against `peak`."
    ok = [x for x in runs if 'error' not in x]
    med = lambda p: sorted(x['tokens_per_s'] for x in ok if x['path'] == p)[len([x for x in ok if x['path'] == p]) // 2]
    have = [p for p in paths if any(x['path'] == p for x in ok)]
    res = {'machine': machine(), 'versions': versions(), 'installed': installed, 'shape': a.shape, 'config': SHAPES[a.shape],
           'kind': a.kind, 'quantization': a.quantization, 'peft': a.peft, 'repeats': a.repeats, 'steps': steps, 'batch_size': bs,
           'max_length': L, 'tokenizer': a.tokenizer, 'data_dir': a.data_dir, 'complete': done, 'runs': runs,
           'tokens_per_s': {p: med(p) for p in have}}
    if {'ours', 'trl'} <= set(res['tokens_per_s']): res['ratio'] = res['tokens_per_s']['ours'] / res['tokens_per_s']['trl']
    if peak is not None:
        res['peak_flops_per_s'], res['peak_dtype'] = peak['flops_per_s'], peak['dtype']
        if ok:
            fpt = ok[0]['flops_per_token']
            res['mfu'] = {p: v * fpt / peak['flops_per_s'] for p, v in res['tokens_per_s'].items()}
    return res

def main(argv=None) -> dict:
    """Measure the paths alternately `repeats` times; write the records, medians, ratio and MFU as JSON after each path
    (`complete` turns true at the end)."""
    global PROGRESS
    a = _cli(argv)
    PROGRESS = not a.quiet
    bundled = a.tokenizer is not None and a.data_dir is not None
    needs = {k: v for k, v in NEEDS.items() if not (bundled and k in BUNDLED)}
    installed = ensure_packages(needs, install=not a.no_install)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    say(f"importing torch, transformers, datasets (missing: {', '.join(installed) or 'none'})")
    import datasets, warnings, torch
    datasets.disable_progress_bars(); warnings.filterwarnings('ignore')
    if a.threads: torch.set_num_threads(a.threads)
    from transformers.utils import logging as tl
    tl.set_verbosity_error()
    say(f"device {device()}: {machine()}; {versions()}")
    big = a.shape == '7b'
    steps, bs, L = a.steps or (4 if big else 6), a.batch_size or (4 if big else 16), a.max_length or (1024 if big else 96)
    tok = tokenizer(a.tokenizer)
    data = load_data(a.kind, tok, L, a.n_train, data_dir=a.data_dir)
    say(f"tokenizer {a.tokenizer or 'tiny Typhoon'} ({len(tok)} tokens), {len(data)} {a.kind} records from {a.data_dir or 'the demo curriculum'}")
    peak = None
    if not a.no_peak:
        sizes = tuple(int(x) for x in a.peak_sizes.split(',')) if a.peak_sizes else PEAK_SIZES.get(a.shape, (1024, 2048))
        peak = matmul_peak(run_dtype(), sizes)
        say(f"{peak['dtype']} matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s (the precision the run computes in)")
    paths, runs, out = a.paths.split(','), [], Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(a.repeats):
        for p in paths:
            kw = {'gradient_checkpointing': True} if p == 'ours' and a.ours_checkpointing else {}
            try: r = measure(p, a.kind, a.shape, a.quantization, a.peft, steps, bs, L, data, tok, **kw)
            except Exception as e:  # out of memory, say: keep the other path's numbers and say what failed
                import gc; gc.collect()
                if torch.cuda.is_available(): torch.cuda.empty_cache()
                r = {'path': p, 'error': f"{type(e).__name__}: {str(e)[:300]}"}
                say(f"path {p} failed: {r['error']}")
            else:
                r['peak_rss_bytes'] = peak_rss()
                print(json.dumps({k: r[k] for k in ('path', 'tokens_per_s', 'peak_memory_bytes')}), flush=True)
            runs.append(r)
            out.write_text(json.dumps(summarize(a, runs, paths, steps, bs, L, installed, peak, False), indent=1, default=str))
            say(f"wrote {out} ({len(runs)} run(s))")
    res = summarize(a, runs, paths, steps, bs, L, installed, peak, True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res.get(k) for k in ('machine', 'tokens_per_s', 'ratio', 'mfu')}, indent=1, default=str), flush=True)
    return res

if __name__ == '__main__': main()
