"""Training throughput and memory of our SFT / DPO path against plain TRL defaults and Unsloth.

The measuring engine of `perf_suite.ipynb` (CPU) and, run as a script on a machine with one H100-class GPU, the QLoRA
checks at Typhoon-7B's full shape:

    python nbs/benchmarks/gpu_perf.py --out gpu_perf.json            # 7b shape, 4bit, lora, ours vs TRL, < 10 min
    python nbs/benchmarks/gpu_perf.py --suite side_by_side           # ours, TRL, Unsloth; 16 / 24 GiB caps; < 9 min

On a GPU machine without network, `nbs/benchmarks/gpu_bundle.py` prepares `.gpu/` (wheels, the tokenizer, the demo
data as JSONL, `run.sh`) and `bash .gpu/run.sh` runs this script with `--no_install --tokenizer .gpu/tokenizer
--data_dir .gpu` (and `--suite side_by_side` when given no arguments): then neither pythainlp nor the embedded tiny
Typhoon build is needed. The script prints timestamped progress lines and rewrites its JSON after each measurement, so
a run cut short keeps what it measured (`--out` defaults to `$OUT/gpu_perf.json` where `$OUT` is set).

**Paths.** `ours`: the trainer `typhoon_nb.stages.build_trainer` builds, with the loader's precision and quantization
and `apply_peft`; `--checkpointing auto` (the default) decides gradient checkpointing and the micro-batch as a run does,
from `typhoon_nb.memory.plan_memory` for the device (the capped size under a memory cap), and records the plan's total.
`trl`: plain `SFTTrainer` / `DPOTrainer` with their config defaults (gradient checkpointing on), the adapter through
`peft_config`. `unsloth`: `FastLanguageModel.from_pretrained(folder, load_in_4bit=True, max_seq_length=...)` of the same
random-init model, saved once into `--unsloth_dir`, then `FastLanguageModel.get_peft_model(r=16, lora_alpha=32,
lora_dropout=0, every linear projection, use_gradient_checkpointing='unsloth')` and TRL's trainers as Unsloth patches
them, with its notebooks' `optim='adamw_8bit'`; its records are given as chat-formatted text (the `text` field of its
notebooks, the same tokens). Unsloth patches transformers, TRL and PEFT when it is imported, so it runs in a process of
its own that imports it first (`GPU_PERF_UNSLOTH_PYTHONPATH`, where set, is that process's PYTHONPATH: the bundle
installs Unsloth with the TRL and datasets releases it supports beside the machine's own transformers). Where it
cannot run (a CPU, not installed, its import fails) its measurements are recorded as skipped or failed with the reason,
never as a number. LoRA is r 16, alpha 32 on every linear projection of the blocks on every path.

**Memory caps** (`--memory_cap_gb none,24,16`): each path runs under each cap in a process of its own (an allocator
fraction cannot be loosened reliably), with `torch.cuda.set_per_process_memory_fraction(N GiB / the device's memory)`
set once the model is on the device (built and quantized; the build holds the bf16 weights on the GPU for a moment,
which a real 4-bit load does not). An out-of-memory error is recorded as `fits: false` with its first line. A CPU has
no such cap: the run measures once, uncapped, and records each cap as not applicable. In each process (`run_cell`) the
path's model is built once and serves, in this order, the SFT rate, the context search and the DPO rate (last, since
TRL's DPO trainer adds a frozen reference adapter to the model).

**Longest context** (`--max_context`, under the caps of `--context_caps`): the longest SFT sequence that trains at batch
1, the record filled to the length (see below), `--context_steps` optimizer steps a trial (the second step holds the
optimizer state beside the activations), an out-of-memory error meaning too long: doubling from `--context_start`
(1,024) up to `--context_ceiling` (Typhoon-7B's 32,768 positions), then bisecting between the last length that trained
and the first that did not down to `--context_step` (256) tokens (`longest_context`).

**Filled records** (`--fill`): every record is made as long as the measurement's length with the demo curriculum's own
text (`filled_records`: a run of demo prompts and answers as the prompt, a demo answer as the answer; the longest that
fits once the chat template is applied), so that every path trains the same real tokens at that length and no path
can skip padding. Without it the demo's short records are used as they are (our path packs them, TRL pads them).

**The side-by-side suite** (`--suite side_by_side`, what `bash .gpu/run.sh` runs by default): Typhoon-7B's shape, 4-bit
NF4 + LoRA r 16 on every linear projection, paths ours, trl, unsloth; SFT at 2 x 2,048 tokens and DPO at 1 x 1,024-token
pairs (filled); caps none, 24 and 16 GiB; tokens/s, peak CUDA memory, MFU and fits per path, kind and cap; the longest
context per path under the 24 and 16 GiB caps; one JSON file with the machine record.

Its time on one H200, estimated (not yet measured there): ~30 s for run.sh's installs and checks; ~15 s for this
process's imports, tokenizer and matmul peak; per process ~10 s of imports and ~5 s of model build, ~6 s per rate (3
steps of ~1 s and the trainer), ~40 s per context search (about 10 trials of 2 steps of 1-3 s at the lengths a 16-24
GiB cap allows, each with its records and trainer); Unsloth ~20 s more per process (its import and 4-bit load) and
~30 s once to save the 14.5 GB bf16 model it loads. Uncut that is 9 processes and ~10 minutes, too long for one
10-minute command, so the suite is cut: 3 steps per rate (1 warm-up + 2 timed), one repeat, no search without a cap (an
H200 would reach the 32,768-token ceiling on every path: ~1 minute per path for nothing), and `--deadline_s 480`. Each
process is given its share of the time left (Unsloth's twice, its first three times, a search's twice); a search stops
bisecting when its share runs out, keeping the interval it narrowed to (`longest` <= the answer < `first_failing`,
`stopped: true`), so the last bisections of the six searches (~1.5 minutes of trials) are what the deadline takes; a
process that overruns its share by 40 s is ended, its finished measurements kept. The command then ends after ~9
minutes (480 s + run.sh's 30 s + at most one process's 40 s of grace), inside the 10 a command may take.

Every model is built from a config with random weights (nothing is downloaded). Tokens are the non-padding tokens the
trainer consumed (`include_num_input_tokens_seen='non_padding'`), counted after the warm-up steps. FLOPs convention:
6 N per token for full training, 4 N for adapters over a frozen base (forward 2 N, backward through the activations
2 N, no weight gradients), N = parameters of the matrix multiplications of the base model (all linear layers and the LM
head at their logical size, quantized or not; not the input embedding table, not the adapters' own small matrices);
attention's sequence-length term is left out (about 4% of the work at 2,048 tokens at Typhoon-7B's shape, more at long
contexts). Memory: on GPU the CUDA peak allocated while training (the model build before it is reported apart), on CPU
the largest RSS seen at a step end; `peak_rss_bytes` is the process's own high-water mark (VmHWM).
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

PATHS = ('ours', 'trl', 'unsloth')
CHECKPOINTING = {'on': True, 'off': False, 'auto': 'auto'}  # --checkpointing -> RunConfig.gradient_checkpointing

# --- memory caps and the memory plan -----------------------------------------------------------------------------------

def parse_caps(text) -> list:
    "`'none,24,16'` -> `[None, 24.0, 16.0]`: memory caps in GiB, `none` for no cap."
    out = []
    for x in str(text).split(','):
        x = x.strip().lower()
        if not x: continue
        if x in ('none', 'no', 'off'): out.append(None); continue
        try: v = float(x)
        except ValueError: raise ValueError(f"--memory_cap_gb: {x!r} is neither a size in GiB nor none") from None
        if v <= 0: raise ValueError(f"--memory_cap_gb: {x!r} must be > 0 GiB")
        out.append(v)
    if not out: raise ValueError("--memory_cap_gb: no cap given (none for no cap)")
    return out

CAP_NA = 'not applicable: a memory cap needs a CUDA device (torch.cuda.set_per_process_memory_fraction); this run is on {dev}'

def set_memory_cap(cap_gb:float|None, dev:str) -> dict:
    "Cap this process's CUDA allocator at `cap_gb` GiB (None: no cap); what was set, or why it does not apply."
    if cap_gb is None: return {'memory_cap_gb': None}
    if dev != 'cuda': return {'memory_cap_gb': cap_gb, 'memory_cap': CAP_NA.format(dev=dev)}
    import torch
    total = torch.cuda.get_device_properties(0).total_memory
    frac = min(1.0, cap_gb * 2**30 / total)
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(frac)
    return {'memory_cap_gb': cap_gb, 'memory_cap_bytes': int(cap_gb * 2**30), 'memory_fraction': frac, 'device_total_bytes': total}

def plan_shape(shape:str) -> dict:
    "The numbers `typhoon_nb.memory.plan_memory` reads from a model's config, for a shape of `SHAPES`."
    s = SHAPES[shape]
    h, nh = s['hidden_size'], s['num_attention_heads']
    return dict(vocab=s['vocab_size'], hidden=h, intermediate=s['intermediate_size'], layers=s['num_hidden_layers'], heads=nh,
                kv_heads=s['num_key_value_heads'], head_dim=h // nh, tied=False, source=f'gpu_perf.SHAPES[{shape!r}]')

def plan_device(cap_gb:float|None, dev:str):
    "The device the memory plan plans for: the one present, or under a cap on CUDA a GPU of the cap's size (its bf16 from the GPU present)."
    from typhoon_nb.memory import Device, resolve_device
    if cap_gb is None or dev != 'cuda': return resolve_device(None)
    import torch
    free, _ = torch.cuda.mem_get_info()
    b = int(cap_gb * 2**30)
    return Device(f"{torch.cuda.get_device_name(0)} capped at {cap_gb:g} GiB", 'cuda', b, min(b, free), torch.cuda.is_bf16_supported(), 'given')

def is_oom(e:BaseException) -> bool:
    "Whether `e` is an out-of-memory error (torch's, or a CUDA / bitsandbytes error saying so)."
    import torch
    return isinstance(e, getattr(torch, 'OutOfMemoryError', ())) or 'out of memory' in str(e).lower()

def first_line(e:BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(': ')


# --- data -----------------------------------------------------------------------------------------------------------------

_DATA = {}  # a process measures the same records many times

def cached_data(kind:str, tok, max_length:int, n:int|None=None, data_dir=None):
    "`load_data`, read once per process for each kind, length, count, folder and tokenizer."
    key = (kind, max_length, n, str(data_dir), getattr(tok, 'name_or_path', ''), len(tok))
    if key not in _DATA: _DATA[key] = load_data(kind, tok, max_length, n, data_dir=data_dir)
    return _DATA[key]

def _n_tokens(tok, msgs) -> int:
    r = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
    return len(r['input_ids'] if hasattr(r, 'keys') else r)

def filled_records(kind:str, tok, length:int, n:int, data_dir=None, distinct:int=2, seed:int=DATA_SEED):
    """`n` records of `kind` (sft | dpo), each `length` tokens long once the chat template is applied (the longest prompt
    that fits: within a few tokens of `length`; DPO: prompt + the longer answer), made of the demo curriculum's own text:
    the prompt is a run of demo prompts and answers, the answer a demo answer. `distinct` different records, repeated to
    `n`. Validated by the data layer (`load_records` with `max_length=length`)."""
    from typhoon_nb.data import load_records
    base = (cached_data(kind, tok, 8192, None, data_dir) if seed == DATA_SEED else load_data(kind, tok, 8192, data_dir=data_dir, seed=seed)).to_list()
    ans = 'completion' if kind == 'sft' else 'chosen'
    texts = [r['prompt'][-1]['content'] + '\n' + r[ans][-1]['content'] for r in base]
    sample = '\n'.join(texts[:64])
    chars_per_token = len(sample) / max(1, len(tok(sample, add_special_tokens=False)['input_ids']))
    recs = []
    for i in range(min(n, distinct)):
        r = base[(7 * i) % len(base)]
        tail = {'completion': r['completion']} if kind == 'sft' else {'chosen': r['chosen'], 'rejected': r['rejected']}
        k, parts, size = 13 * i, [], 0
        def grow(chars:int):
            nonlocal k, size
            while size < chars:
                parts.append(texts[k % len(texts)]); size += len(parts[-1]) + 1; k += 1
            return '\n'.join(parts)
        pool = grow(int(length * chars_per_token * 1.3) + 64)
        fits = lambda c: max(_n_tokens(tok, [{'role': 'user', 'content': pool[:c]}] + a) for a in tail.values()) <= length
        if not fits(1): raise ValueError(f"filled_records: {length} tokens is shorter than the chat template and a demo answer")
        while fits(len(pool)): pool = grow(2 * len(pool))
        lo, hi = 1, len(pool)  # fits(lo), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid): lo = mid
            else: hi = mid
        recs.append({'prompt': [{'role': 'user', 'content': pool[:lo]}], **tail})
    recs = [recs[i % len(recs)] for i in range(n)]
    ds, _ = load_records(recs, kind, tokenizer=tok, max_length=length, normalize=False, name=f'{kind} records filled to {length} tokens')
    return ds

def as_text(ds, kind:str, tok):
    """The records as chat-formatted text, as Unsloth's notebooks give them: SFT `text`; DPO `prompt` (with the
    generation prompt), `chosen` and `rejected` (what follows the prompt). The same tokens as the chat records."""
    import datasets
    t = lambda msgs, **kw: tok.apply_chat_template(msgs, tokenize=False, **kw)
    if kind == 'sft': return datasets.Dataset.from_list([{'text': t(r['prompt'] + r['completion'])} for r in ds])
    out = []
    for r in ds:
        p = t(r['prompt'], add_generation_prompt=True)
        cut = lambda s: s[len(p):] if s.startswith(p) else s
        out.append({'prompt': p, 'chosen': cut(t(r['prompt'] + r['chosen'])), 'rejected': cut(t(r['prompt'] + r['rejected']))})
    return datasets.Dataset.from_list(out)

# --- the paths -------------------------------------------------------------------------------------------------------------

def ours_model(shape:str, quantization:str, peft:str, dev:str, tok, precision:str='auto', **overrides):
    "Our path's model: built in the loader's precision, quantized as the loader does, with `apply_peft`'s adapters."
    from typhoon_nb.config import RunConfig
    from typhoon_nb.loader import resolve_precision, quantization_config, quantize_in_place
    from typhoon_nb.adapters import apply_peft
    cfg = RunConfig(quantization=quantization, peft_method=peft, precision=precision, **overrides).validate()
    dtype, _ = resolve_precision(cfg.precision, dev)
    say(f"ours: building the {shape} model in {str(dtype).split('.')[-1]} on {dev}")
    model = build_model(shape, dtype, dev, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if quantization != 'none':
        say(f"ours: quantizing to {quantization}")
        model.config.quantization_config = quantization_config(quantization, dtype)  # as the loader's from_pretrained leaves it
        quantize_in_place(model, model.config.quantization_config, dev)
    say(f"ours: adding {peft} adapters")
    model, _ = apply_peft(model, cfg)
    return model

def ours_trainer(kind:str, shape:str, quantization:str, peft:str, steps:int, batch_size:int, max_length:int, data, tok,
                 clock, dev:str, out_dir:str, precision:str='auto', lr:float=2e-4, args:dict|None=None, off:tuple=(),
                 model=None, checkpointing:str|None=None, cap_gb:float|None=None, **overrides):
    """Our path: the loader's precision and quantization, `apply_peft`, and the trainer `typhoon_nb.stages.build_trainer` builds.
    `off` names speed-ups of that trainer to leave out, for measuring them: `row_packing` (TRL's one-row padding-free
    batches instead), `fast_lora` (torch's dropout and PEFT's input casts). `model`: one `ours_model` built before (its
    checkpointing set for this trainer). `checkpointing` on | off | auto (None: the config's, unresolved); auto asks
    `plan_memory` for the device (under `cap_gb` a GPU of that size) and takes its decisions, checkpointing and
    micro-batch, as `run(cfg)` does; the trainer carries `gpu_perf_info` (what was asked and decided, the plan's total)."""
    import contextlib
    from unittest import mock
    import typhoon_nb.refinements as refinements, typhoon_nb.adapters as adapters
    from typhoon_nb.config import RunConfig, StageConfig
    from typhoon_nb.stages import build_trainer
    if checkpointing is not None:
        if checkpointing not in CHECKPOINTING: raise ValueError(f"checkpointing: {checkpointing!r}; one of {', '.join(CHECKPOINTING)}")
        overrides['gradient_checkpointing'] = CHECKPOINTING[checkpointing]
    stage = StageConfig(kind=kind, data=f'demo:{kind}', batch_size=batch_size, max_length=max_length, max_steps=steps, save_steps=0,
                        eval_samples=0, lr=lr, reference='entering')
    cfg = RunConfig(quantization=quantization, peft_method=peft, precision=precision, stages=[stage], **overrides).validate()
    info = {'checkpointing_asked': checkpointing}
    if checkpointing == 'auto':
        from typhoon_nb.memory import plan_memory
        plan = plan_memory(cfg, plan_device(cap_gb, dev), shape=plan_shape(shape))
        cfg = plan.apply(cfg); stage = cfg.stages[0]
        info |= {'plan_total_bytes': plan.total, 'plan_fits': plan.fits, 'plan_device': str(plan.device), 'plan_notes': plan.notes}
        say(f"ours: memory plan for {plan.device}: {plan.total / 2**30:.2f} GiB, checkpointing {'on' if plan.gradient_checkpointing else 'off'}, "
            f"micro-batch {stage.batch_size} x {stage.grad_accum}" + ('' if plan.fits else ' (the plan says it does not fit: measured anyway)'))
    info |= {'micro_batch': stage.batch_size, 'grad_accum': stage.grad_accum}
    if model is None:
        model = ours_model(shape, quantization, peft, dev, tok, precision, **{k: v for k, v in overrides.items() if k != 'gradient_checkpointing'},
                           gradient_checkpointing=cfg.gradient_checkpointing is True)
    from typhoon_nb.compat import set_checkpointing
    set_checkpointing(model, cfg.gradient_checkpointing is True)
    say(f"ours: building the {kind} trainer")
    unknown = set(off) - {'row_packing', 'fast_lora'}
    if unknown: raise ValueError(f"off: unknown speed-up(s) {sorted(unknown)}; known: row_packing, fast_lora")
    with contextlib.ExitStack() as stack:
        if 'row_packing' in off: stack.enter_context(mock.patch.object(refinements, 'row_packing', lambda tr: False))
        if 'fast_lora' in off: stack.enter_context(mock.patch.object(adapters, 'fast_lora_cpu', lambda tr: {}))
        tr = build_trainer(cfg, stage, model, tok, data, out_dir, [clock], progress=False)
    tr.args.include_num_input_tokens_seen = 'non_padding'
    for k, v in (args or {}).items(): setattr(tr.args, k, v)  # settings read when training starts (dataloader)
    tr.gpu_perf_info = info
    return _quiet(tr)

def trl_model(shape:str, quantization:str, dev:str, tok):
    "Plain TRL's model: in its checkpoint dtype (fp32 at the small shapes, bf16 at 7b), quantized, no adapter yet."
    import torch
    from typhoon_nb.loader import quantization_config, quantize_in_place
    dtype = torch.bfloat16 if shape == '7b' else torch.float32
    say(f"trl: building the {shape} model in {str(dtype).split('.')[-1]} on {dev}")
    model = build_model(shape, dtype, dev, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if quantization != 'none':
        say(f"trl: quantizing to {quantization}")
        quantize_in_place(model, quantization_config(quantization, getattr(torch, run_dtype(dev)) if dev == 'cpu' else torch.bfloat16), dev)
    return model

def trl_trainer(kind:str, shape:str, quantization:str, peft:str, steps:int, batch_size:int, max_length:int, data, tok,
                clock, dev:str, out_dir:str, lr:float=2e-4, padding_free:bool=False, model=None, **args):
    """Plain TRL: `SFTConfig()` / `DPOConfig()` defaults (bf16, gradient checkpointing, no packing), the model in its
    checkpoint dtype (fp32 at the small shapes, bf16 at 7b), the adapter through `peft_config`; only the step count, batch,
    `max_length`, learning rate, logging and `use_cpu` (needed on a CPU) are set, plus `args`. On a CPU without bf16
    hardware, bf16 autocast and the 4-bit compute dtype are turned off (fp32), as our path's `precision: auto` does
    there: emulated bf16 would measure the emulation, not TRL. `model`: a model built before (`trl_model`, or the one a
    previous trainer wrapped: then no `peft_config`)."""
    from peft import LoraConfig, PrefixTuningConfig
    from typhoon_nb.config import RunConfig
    if model is None: model = trl_model(shape, quantization, dev, tok)
    say(f"trl: building the {kind} trainer ({peft} through peft_config)")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules='all-linear', task_type='CAUSAL_LM')
    peft_config = {'lora': lora, 'prefix': PrefixTuningConfig(num_virtual_tokens=16, task_type='CAUSAL_LM')}.get(peft)
    if hasattr(model, 'peft_config'): peft_config = None  # wrapped by an earlier trainer of this path
    elif peft == 'both':  # one peft_config cannot say LoRA + prefix: the model comes wrapped as our adapters build it
        from typhoon_nb.adapters import apply_peft
        model, _ = apply_peft(model, RunConfig(quantization=quantization, peft_method='both'))
    kw = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr, report_to=[],
              save_strategy='no', logging_steps=1, disable_tqdm=True, include_num_input_tokens_seen='non_padding', max_length=max_length,
              use_cpu=dev == 'cpu') | ({'bf16': False} if dev == 'cpu' and run_dtype(dev) != 'bfloat16' else {}) | args
    if padding_free: kw |= dict(padding_free=True, max_length=None)  # TRL's rule; the data layer checked every record fits
    if kind == 'sft':
        from trl import SFTConfig, SFTTrainer
        tr = SFTTrainer(model=model, args=SFTConfig(**kw), train_dataset=data, processing_class=tok, peft_config=peft_config, callbacks=[clock])
    else:
        from trl import DPOConfig, DPOTrainer
        tr = DPOTrainer(model=model, args=DPOConfig(**kw), train_dataset=data, processing_class=tok, peft_config=peft_config, callbacks=[clock])
    tr.gpu_perf_info = {'checkpointing_asked': 'TRL default'}
    return _quiet(tr)

UNSLOTH_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']

def unsloth_unavailable(dev:str|None=None) -> tuple[str, str]|None:
    """Why Unsloth cannot run in this process, as (status, why), or None after importing it. It must be imported before
    transformers, TRL and PEFT, and it needs a CUDA GPU; torch alone may be imported before."""
    if 'unsloth' in sys.modules: return None
    if (dev := dev or device()) != 'cuda': return 'skipped', f"Unsloth needs a CUDA GPU; this run is on {dev}"
    if importlib.util.find_spec('unsloth') is None: return 'skipped', 'unsloth is not installed (the bundle brings it: .gpu/wheels/unsloth)'
    late = [m for m in ('transformers', 'trl', 'peft') if m in sys.modules]
    if late: return 'skipped', f"Unsloth must be imported before {', '.join(late)}: run it in a process of its own (--isolate yes)"
    try: import unsloth  # noqa: F401
    except Exception as e:  # a missing dependency, a version it refuses
        return 'failed', 'import unsloth failed: ' + first_line(e)
    return None

def unsloth_model(shape:str, tok, dev:str, max_seq_length:int, folder):
    """Unsloth's model: the random-init model of `shape` (bf16), saved once into `folder` with the tokenizer, loaded by
    `FastLanguageModel.from_pretrained(folder, load_in_4bit=True)`, LoRA by `FastLanguageModel.get_peft_model`."""
    from unsloth import FastLanguageModel
    import torch
    folder = Path(folder)
    if not (folder / 'gpu_perf_saved').exists():
        say(f"unsloth: saving the random-init {shape} model (bf16) into {folder}, once")
        m = build_model(shape, torch.bfloat16, dev, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        m.save_pretrained(str(folder)); tok.save_pretrained(str(folder))
        (folder / 'gpu_perf_saved').write_text(shape)
        del m; _free(dev)
    say(f"unsloth: FastLanguageModel.from_pretrained({folder}, load_in_4bit=True, max_seq_length={max_seq_length})")
    model, utok = FastLanguageModel.from_pretrained(model_name=str(folder), max_seq_length=max_seq_length, dtype=None, load_in_4bit=True,
                                                    fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=UNSLOTH_TARGETS, bias='none',
                                             use_gradient_checkpointing='unsloth', random_state=0)
    model.gpu_perf_tokenizer = utok
    return model

def unsloth_trainer(kind:str, shape:str, quantization:str, peft:str, steps:int, batch_size:int, max_length:int, data, tok,
                    clock, dev:str, out_dir:str, lr:float=2e-4, model=None, model_dir=None, max_seq_length:int|None=None, **args):
    """Unsloth: TRL's `SFTTrainer` / `DPOTrainer` as Unsloth patches them, over `unsloth_model`'s model (4-bit NF4, LoRA r
    16 on every linear projection, its own gradient checkpointing), with its notebooks' `adamw_8bit`; the records as
    chat-formatted text (`as_text`)."""
    if (quantization, peft) != ('4bit', 'lora'): raise ValueError(f"unsloth path: measured with 4bit + lora only, got {quantization} + {peft}")
    if model is None:
        model = unsloth_model(shape, tok, dev, max_seq_length or max_length, model_dir or Path(tempfile.gettempdir()) / f'gpu_perf_unsloth_{shape}')
    import torch
    utok = getattr(model, 'gpu_perf_tokenizer', None) or tok
    bf16 = torch.cuda.is_bf16_supported()
    kw = dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, learning_rate=lr,
              optim='adamw_8bit', bf16=bf16, fp16=not bf16, report_to=[], save_strategy='no', logging_steps=1, disable_tqdm=True,
              include_num_input_tokens_seen='non_padding', max_length=max_length, dataset_num_proc=1) | args
    say(f"unsloth: building the {kind} trainer")
    if kind == 'sft':
        from trl import SFTConfig, SFTTrainer
        tr = SFTTrainer(model=model, processing_class=utok, train_dataset=as_text(data, kind, tok),
                        args=SFTConfig(**kw, dataset_text_field='text', packing=False), callbacks=[clock])
    else:
        from trl import DPOConfig, DPOTrainer
        tr = DPOTrainer(model=model, ref_model=None, processing_class=utok, train_dataset=as_text(data, kind, tok), args=DPOConfig(**kw),
                        callbacks=[clock])
    tr.gpu_perf_info = {'checkpointing_asked': 'unsloth'}
    return _quiet(tr)

TRAINERS = {'ours': 'ours_trainer', 'trl': 'trl_trainer', 'unsloth': 'unsloth_trainer'}

def _free(dev:str):
    "Collect garbage and give cached GPU memory back (between two models)."
    import gc, torch
    gc.collect()
    if dev == 'cuda': torch.cuda.empty_cache()

def measure(path:str, kind:str='sft', shape:str='30m', quantization:str='none', peft:str='lora', steps:int=6,
            batch_size:int=16, max_length:int=96, data=None, tok=None, warmup:int=1, hold:dict|None=None, rate:bool=True, **kw) -> dict:
    """Build `path`'s trainer (ours | trl | unsloth) for one configuration, train `steps` steps; tokens/s after `warmup`
    steps, memory, FLOPs. Without `hold` the model is built for this measurement and freed before returning; with it,
    `hold['model']` is used (built where missing) and kept there for the next one. `rate=False`: only whether it trains."""
    import torch
    dev = device()
    tok = tok or tokenizer()
    data = data if data is not None else load_data(kind, tok, max_length)
    clock = Clock(warmup if rate else 0)
    if dev == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    if hold is not None: kw['model'] = hold.get('model')
    with tempfile.TemporaryDirectory() as td:
        make = globals()[TRAINERS[path]]
        t0, note = time.perf_counter(), None  # note: set where a run needed a change
        tr = make(kind, shape, quantization, peft, steps, batch_size, max_length, data, tok, clock, dev, td, **kw)
        if hold is not None: hold['model'] = tr.model
        setup = time.perf_counter() - t0
        n_matmul = matmul_params(tr.model)
        mem = {}
        if dev == 'cuda':  # the build's peak (a bf16 model before quantization) apart from training's
            mem = {'setup_peak_memory_bytes': torch.cuda.max_memory_allocated()}
            torch.cuda.reset_peak_memory_stats()
        say(f"{path}: trainer ready after {setup:.1f} s; training {steps} steps of {batch_size} x {max_length}")
        t1 = time.perf_counter()
        try: out = tr.train()
        except BaseException:
            if hold is not None: tr.model.zero_grad(set_to_none=True)  # an out-of-memory error mid-step leaves gradients on the kept model
            raise
        if rate: tps, tokens, secs = clock.rate()
        else: tps, tokens, secs = None, tr.state.num_input_tokens_seen, time.perf_counter() - t1
        if dev == 'cuda': mem |= {'cuda_max_reserved_bytes': torch.cuda.max_memory_reserved()}
        from typhoon_nb.compat import args_checkpointing_field
        ck = getattr(tr.args, args_checkpointing_field(type(tr.args)))
        res = {'path': path, 'kind': kind, 'shape': shape, 'quantization': quantization, 'peft': peft, 'steps': tr.state.global_step,
               'batch_size': batch_size, 'max_length': max_length, 'tokens_per_s': tps, 'tokens': tokens, 'seconds': secs,
               'setup_seconds': setup, 'loss': out.training_loss, 'matmul_params': n_matmul, 'flops_per_token': flops_per_token(n_matmul, peft),
               'bf16': bool(tr.args.bf16), 'gradient_checkpointing': 'unsloth' if path == 'unsloth' else bool(ck),
               'padding_free': bool(getattr(tr.args, 'padding_free', False) or getattr(tr.args, 'packing', False)),
               'peak_memory_bytes': torch.cuda.max_memory_allocated() if dev == 'cuda' else clock.rss,
               'memory_kind': 'cuda_max_allocated_training' if dev == 'cuda' else 'rss_seen_during_training', 'note': note} | mem
        res |= getattr(tr, 'gpu_perf_info', {})
        del tr, out
        _free(dev)
    if dev == 'cuda': res['cuda_allocated_after_free_bytes'] = torch.cuda.memory_allocated()
    if rate:
        say(f"{path}: {tps:,.0f} tokens/s ({tokens} tokens in {secs:.2f} s), peak memory {res['peak_memory_bytes'] / 2**30:.2f} GiB"
            + (f", {res['cuda_allocated_after_free_bytes'] / 2**20:.0f} MiB still allocated after freeing" if dev == 'cuda' else ''))
    return res

# --- the longest context ---------------------------------------------------------------------------------------------

def longest_context(trains, start:int=1024, ceiling:int=32768, step:int=256, stop=None, trials:list|None=None) -> dict:
    """The longest length `trains(length) -> bool` accepts, to `step` tokens: doubling from `start` (up to `ceiling`)
    while it trains, then bisecting between the last length that trained and the first that did not (where `start`
    already fails: between 0 and `start`). Lengths tried are multiples of `step`; a longer length is assumed never to
    train where a shorter one failed. `stop() -> True` ends the search early (a time limit): the result still brackets
    the answer, `longest` <= answer < `first_failing`. Each trial is appended to `trials` as it ends."""
    if step <= 0 or start % step or ceiling % step or start > ceiling:
        raise ValueError(f"longest_context: start {start} and ceiling {ceiling} must be multiples of step {step}, start <= ceiling")
    trials = [] if trials is None else trials
    def t(n:int) -> bool:
        ok = bool(trains(n)); trials.append({'length': n, 'trains': ok}); return ok
    lo, hi, stopped, n = 0, None, False, start
    while True:  # doubling
        if stop is not None and stop(): stopped = True; break
        if not t(n): hi = n; break
        lo = n
        if n >= ceiling: break
        n = min(2 * n, ceiling)
    while not stopped and hi is not None and hi - lo > step:  # bisecting
        if stop is not None and stop(): stopped = True; break
        mid = max(lo + step, (lo + hi) // 2 // step * step)
        if t(mid): lo = mid
        else: hi = mid
    return {'longest': lo, 'first_failing': hi, 'resolution': None if hi is None else hi - lo, 'reached_ceiling': lo >= ceiling,
            'stopped': stopped, 'start': start, 'ceiling': ceiling, 'step': step, 'trials': trials}

# --- one path under one memory cap ----------------------------------------------------------------------------------------

def _prebuild(path:str, spec:dict, tok, dev:str):
    "The path's model, built once for every measurement of a cell."
    s = spec
    if path == 'ours': return ours_model(s['shape'], s['quantization'], s['peft'], dev, tok)
    if path == 'trl': return trl_model(s['shape'], s['quantization'], dev, tok)
    longest = max([v['max_length'] for v in s['settings'].values()] + ([s['context_ceiling']] if s.get('context') else []))
    return unsloth_model(s['shape'], tok, dev, longest, s['unsloth_dir'])

def _path_kw(path:str, spec:dict) -> dict:
    if path == 'ours': return {'checkpointing': spec.get('checkpointing'), 'cap_gb': spec.get('memory_cap_gb')}
    return {}

def run_cell(spec:dict, report=None) -> dict:
    """One path under one memory cap: its model built once, then the SFT rate, the longest-context search (SFT at batch
    1), the DPO rate (last: TRL's DPO trainer adds a frozen reference adapter to the model). `spec` holds the path, the
    cap, the shape, quantization, adapter, per kind {batch_size, max_length, steps}, fill, context settings, deadline
    (time.time()), tokenizer and data_dir. Returns {'records': [...], 'contexts': [...], 'cap': ...}; `report(result)`
    is called after each measurement."""
    path, cap, kinds = spec['path'], spec.get('memory_cap_gb'), list(spec['kinds'])
    out = {'path': path, 'memory_cap_gb': cap, 'records': [], 'contexts': []}
    base = {'path': path, 'memory_cap_gb': cap}
    ctx = spec.get('context')
    def emit(): report is not None and report(out)
    def none_run(status:str, why:str, field:str='why'):
        out['records'] += [base | {'kind': k, 'status': status, 'fits': None, field: why} for k in kinds]
        if ctx: out['contexts'].append(base | {'kind': 'sft', 'status': status, field: why})
        emit(); return out
    if path not in PATHS: raise ValueError(f"path: {path!r}; one of {', '.join(PATHS)}")
    if path == 'unsloth' and (bad := unsloth_unavailable()):
        out['unavailable'] = {'status': bad[0], 'fits': None, 'why' if bad[0] == 'skipped' else 'error': bad[1]}
        return none_run(bad[0], bad[1], 'why' if bad[0] == 'skipped' else 'error')
    dev = device()
    if cap is not None and dev != 'cuda': return none_run('n/a', CAP_NA.format(dev=dev))
    tok = tokenizer(spec.get('tokenizer'))
    deadline = spec.get('deadline')
    late = lambda margin=0.0: deadline is not None and time.time() + margin > deadline
    hold, dd = {}, spec.get('data_dir')
    try:
        hold['model'] = _prebuild(path, spec, tok, dev)
    except Exception as e:
        return none_run('oom' if is_oom(e) else 'failed', 'building the model: ' + first_line(e), 'error')
    _free(dev)
    out['cap'] = set_memory_cap(cap, dev)
    kw = _path_kw(path, spec)

    def data_for(kind:str, length:int, n:int, distinct:int=2):
        if spec.get('fill'): return filled_records(kind, tok, length, n, dd, distinct)
        return cached_data(kind, tok, length, spec.get('n_train'), dd)

    spent = {}
    def rate(kind:str):
        st = spec['settings'][kind]
        if late(-(GRACE_S - 15)):  # a rate is short and wanted: it may start until 25 s past this process's share
            out['records'].append(base | {'kind': kind, 'status': 'skipped', 'fits': None, 'why': 'out of time (--deadline_s)'}); return
        failed, t0 = None, time.time()
        try:
            r = measure(path, kind, spec['shape'], spec['quantization'], spec['peft'], st['steps'], st['batch_size'], st['max_length'],
                        data_for(kind, st['max_length'], st['steps'] * st['batch_size']), tok, hold=hold, **kw)
            r |= {'memory_cap_gb': cap, 'status': 'ok', 'fits': True, 'peak_rss_bytes': peak_rss()}
        except Exception as e:
            failed = base | {'kind': kind, 'status': 'oom' if is_oom(e) else 'failed', 'fits': False if is_oom(e) else None, 'error': first_line(e)}
            say(f"{path} {kind} under cap {cap}: {failed['error']}")
        if failed is not None: r = failed; _free(dev)
        spent[kind] = time.time() - t0
        out['records'].append(r); emit()
        if r['status'] == 'ok': print(json.dumps({k: r[k] for k in ('path', 'kind', 'memory_cap_gb', 'tokens_per_s', 'peak_memory_bytes')}), flush=True)

    def search():
        cs, trials, last = spec.get('context_steps', 2), [], {'s': 5.0}
        detail = {}
        def trains(n:int) -> bool:
            t0, failed = time.time(), None
            try:
                r = measure(path, 'sft', spec['shape'], spec['quantization'], spec['peft'], cs, 1, n, filled_records('sft', tok, n, cs, dd, 1), tok,
                            hold=hold, rate=False, **kw)
                detail[n] = {k: r.get(k) for k in ('peak_memory_bytes', 'tokens', 'gradient_checkpointing', 'plan_total_bytes', 'plan_fits')}
            except Exception as e:
                if not is_oom(e): raise
                failed = first_line(e)
            if failed is not None: detail[n] = {'error': failed}; _free(dev)
            last['s'] = time.time() - t0
            detail[n]['seconds'] = last['s']
            say(f"{path} context {n} under cap {cap}: " + ('trains' if failed is None else failed))
            return failed is None
        rec = base | {'kind': 'sft', 'batch_size': 1, 'steps_per_trial': cs, 'status': 'ok'}
        reserve = max(15.0, spent.get('sft', 15.0)) if any(k != 'sft' for k in kinds) else 0.0  # time kept for the DPO rate after the search
        try:
            res = longest_context(trains, spec.get('context_start', 1024), spec.get('context_ceiling', 32768), spec.get('context_step', 256),
                                  stop=lambda: late(2 * last['s'] + reserve), trials=trials)
            rec |= res
        except Exception as e:
            rec |= {'status': 'failed', 'error': first_line(e), 'trials': trials}
            _free(dev)
        for t in rec['trials']: t |= detail.get(t['length'], {})
        out['contexts'].append(rec); emit()
        say(f"{path} under cap {cap}: longest context {rec.get('longest')} (first failing {rec.get('first_failing')})")

    if 'sft' in kinds: rate('sft')
    if ctx: search()
    for k in kinds:
        if k != 'sft': rate(k)
    return out

# --- the matrix and the suite --------------------------------------------------------------------------------------------

def expand_cells(paths, caps, kinds, context_caps=(), repeats:int=1, max_context:bool=False) -> list[dict]:
    """The cells of a run in the order they run: per repeat, per memory cap, per path. Each measures `kinds`; the
    longest-context search runs in the first repeat under the caps of `context_caps` (when `max_context`)."""
    return [{'path': p, 'memory_cap_gb': c, 'kinds': list(kinds), 'context': bool(max_context and r == 0 and c in list(context_caps)), 'repeat': r}
            for r in range(repeats) for c in caps for p in paths]

SUITES = {'side_by_side': dict(  # the GPU matrix: see the module docstring for what it measures and its time
    shape='7b', quantization='4bit', peft='lora', paths='ours,trl,unsloth', kind='sft,dpo', memory_cap_gb='none,24,16',
    batch_size=2, max_length=2048, dpo_batch_size=1, dpo_max_length=1024, steps=3, repeats=1, checkpointing='auto', fill=True,
    max_context=True, context_caps='24,16', context_start=1024, context_ceiling=32768, context_step=256, context_steps=2,
    deadline_s=480, isolate='yes')}

def suite_args(a) -> None:
    "Fill the options a `--suite` preset sets and the command line left at their default (None)."
    if a.suite is None: return
    if a.suite not in SUITES: raise SystemExit(f"--suite: unknown {a.suite!r}; known: {', '.join(SUITES)}")
    for k, v in SUITES[a.suite].items():
        if getattr(a, k, None) in (None, False): setattr(a, k, v)

GRACE_S = 40  # seconds a process may run past its share of --deadline_s before it is ended

def _child_env(path:str) -> dict:
    env = dict(os.environ)
    env.setdefault('HF_HUB_OFFLINE', '1')
    if path == 'unsloth':
        if os.environ.get('GPU_PERF_UNSLOTH_PYTHONPATH'): env['PYTHONPATH'] = os.environ['GPU_PERF_UNSLOTH_PYTHONPATH']
        env.setdefault('UNSLOTH_DISABLE_STATISTICS', '1')
        env.setdefault('UNSLOTH_COMPILE_LOCATION', str(Path(tempfile.gettempdir()) / 'unsloth_compiled_cache'))
    return env

def run_child(spec:dict, timeout:float|None=None) -> dict:
    """`run_cell(spec)` in a fresh process (`gpu_perf.py --_cell SPEC`), its progress on this one's stdout; what it
    finished is kept when it fails or overruns `timeout` seconds (it is then ended), the rest recorded as failed."""
    with tempfile.TemporaryDirectory() as td:
        sp, op, ep = Path(td) / 'spec.json', Path(td) / 'out.json', Path(td) / 'stderr.txt'
        sp.write_text(json.dumps(spec | {'out': str(op)}))
        with open(ep, 'w') as err:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '--_cell', str(sp)], stderr=err, env=_child_env(spec['path']))
            try: rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill(); proc.wait(); rc = None
        res = json.loads(op.read_text()) if op.exists() else {'path': spec['path'], 'memory_cap_gb': spec.get('memory_cap_gb'), 'records': [], 'contexts': []}
        tail = [l for l in ep.read_text(errors='replace').splitlines() if l.strip()][-15:]
        if rc != 0:
            why = f"its process was ended after {timeout:.0f} s (its share of --deadline_s)" if rc is None else f"its process exited with code {rc}"
            res['exit'] = why
            if tail: print('\n'.join(f"  [{spec['path']} stderr] {l}" for l in tail), file=sys.stderr, flush=True)
            last = tail[-1][:300] if tail else ''
            base = {'path': spec['path'], 'memory_cap_gb': spec.get('memory_cap_gb')}
            have = {r['kind'] for r in res['records']}
            res['records'] += [base | {'kind': k, 'status': 'failed', 'fits': None, 'error': f"{why}: {last}".rstrip(': ')} for k in spec['kinds'] if k not in have]
            if spec.get('context') and not res['contexts']:
                res['contexts'].append(base | {'kind': 'sft', 'status': 'failed', 'error': f"{why}: {last}".rstrip(': ')})
        return res

def _child(spec_path:str) -> dict:
    "The child process's side of `run_child`: Unsloth first where it is the path, then `run_cell`, the result written after each measurement."
    global PROGRESS
    spec = json.loads(Path(spec_path).read_text())
    PROGRESS = not spec.get('quiet')
    if spec['path'] == 'unsloth':
        bad = unsloth_unavailable()  # imports it before anything imports transformers
        if bad: say(f"unsloth: {bad[1]}")
    import warnings, torch
    warnings.filterwarnings('ignore')
    if spec.get('threads'): torch.set_num_threads(spec['threads'])
    import datasets
    from transformers.utils import logging as tl
    datasets.disable_progress_bars(); tl.set_verbosity_error()
    out = Path(spec['out'])
    write = lambda res: out.write_text(json.dumps(res, default=str))
    say(f"process for {spec['path']} under cap {spec.get('memory_cap_gb')}: torch {torch.__version__}, {versions()}")
    res = run_cell(spec, report=write)
    write(res)
    return res

# --- the command line ------------------------------------------------------------------------------------------------------

def _cli(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--suite', default=None, help=f"a preset: {', '.join(SUITES)} (options given on the command line win)")
    ap.add_argument('--shape', default=None, choices=list(SHAPES), help='model shape (default: 7b)')
    ap.add_argument('--kind', default=None, help='sft, dpo or both (sft,dpo) (default: sft)')
    ap.add_argument('--quantization', default=None, choices=('4bit', '8bit', 'none'), help='default: 4bit')
    ap.add_argument('--peft', default=None, choices=('lora', 'prefix', 'both'), help='default: lora')
    ap.add_argument('--paths', default=None, help='comma-separated: ours, trl, unsloth (default: ours,trl; run alternately)')
    ap.add_argument('--repeats', type=int, default=None)
    ap.add_argument('--steps', type=int, default=None, help='optimizer steps per measurement (default: 6, or 4 at 7b)')
    ap.add_argument('--batch_size', type=int, default=None, help='sequences per step (default: 16, or 4 at 7b)')
    ap.add_argument('--max_length', type=int, default=None, help='tokens per sequence / packed block (default: 96, or 1024 at 7b)')
    ap.add_argument('--dpo_batch_size', type=int, default=None, help='DPO pairs per step (default: --batch_size)')
    ap.add_argument('--dpo_max_length', type=int, default=None, help='DPO tokens per sequence (default: --max_length)')
    ap.add_argument('--n_train', type=int, default=None, help='use the first N demo records (default: all)')
    ap.add_argument('--fill', action='store_true', help='records filled to the length with demo text (filled_records), the same tokens on every path')
    ap.add_argument('--memory_cap_gb', default=None, help='comma-separated caps in GiB, none for no cap (default: none); CUDA only')
    ap.add_argument('--checkpointing', default=None, choices=tuple(CHECKPOINTING), help="our path's gradient checkpointing (default: auto, as a run decides it)")
    ap.add_argument('--ours_checkpointing', action='store_true', help='the same as --checkpointing on')
    ap.add_argument('--max_context', action='store_true', help='search the longest SFT context at batch 1 (see --context_*)')
    ap.add_argument('--context_caps', default=None, help='caps under which to search (default: every cap of --memory_cap_gb)')
    ap.add_argument('--context_start', type=int, default=None, help='first length tried (default: 1024)')
    ap.add_argument('--context_ceiling', type=int, default=None, help="longest length tried (default: the shape's max_position_embeddings)")
    ap.add_argument('--context_step', type=int, default=None, help='granularity of the bisection (default: 256)')
    ap.add_argument('--context_steps', type=int, default=None, help='optimizer steps per trial (default: 2)')
    ap.add_argument('--isolate', default=None, choices=('auto', 'yes', 'no'),
                    help='a process per path and cap (auto: on CUDA where there are caps or Unsloth)')
    ap.add_argument('--deadline_s', type=float, default=None, help='seconds this command may take (shared among the processes; default: no limit)')
    ap.add_argument('--unsloth_dir', default=None, help="where Unsloth's copy of the random-init model is saved (default: a temp folder)")
    ap.add_argument('--tokenizer', default=None, help="a saved tokenizer's folder (default: the embedded tiny Typhoon's, built on first use)")
    ap.add_argument('--data_dir', default=None, help='a folder with sft.jsonl / dpo.jsonl (default: the demo curriculum, which needs pythainlp)')
    ap.add_argument('--no_install', action='store_true', help='do not pip-install missing packages')
    ap.add_argument('--no_peak', action='store_true', help='skip the matmul peak (no MFU)')
    ap.add_argument('--peak_sizes', default=None, help='comma-separated square sizes of the matmul peak (default: 256,512 at tiny, else 1024,2048)')
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    ap.add_argument('--quiet', action='store_true', help='no progress lines')
    ap.add_argument('--out', default=str(Path(os.environ['OUT']) / 'gpu_perf.json') if os.environ.get('OUT') else 'gpu_perf.json',
                    help='results JSON, rewritten after each measurement (default: $OUT/gpu_perf.json where $OUT is set)')
    ap.add_argument('--_cell', default=None, help=argparse.SUPPRESS)  # internal: run one cell (run_child)
    a = ap.parse_args(argv)
    if a._cell: return a
    suite_args(a)
    defaults = dict(shape='7b', kind='sft', quantization='4bit', peft='lora', paths='ours,trl', repeats=1, memory_cap_gb='none',
                    checkpointing='on' if a.ours_checkpointing else 'auto', context_start=1024, context_step=256, context_steps=2, isolate='auto')
    for k, v in defaults.items():
        if getattr(a, k) is None: setattr(a, k, v)
    if a.ours_checkpointing and a.checkpointing != 'on': ap.error('--ours_checkpointing is --checkpointing on; both given, and they differ')
    big = a.shape == '7b'
    a.steps, a.batch_size, a.max_length = a.steps or (4 if big else 6), a.batch_size or (4 if big else 16), a.max_length or (1024 if big else 96)
    a.dpo_batch_size, a.dpo_max_length = a.dpo_batch_size or a.batch_size, a.dpo_max_length or a.max_length
    a.context_ceiling = a.context_ceiling or SHAPES[a.shape]['max_position_embeddings']
    if a.max_context and (a.context_start > a.context_ceiling or a.context_start % a.context_step or a.context_ceiling % a.context_step):
        ap.error(f"--context_start {a.context_start} and --context_ceiling {a.context_ceiling} must be multiples of --context_step {a.context_step}, start <= ceiling")
    a.kinds = [k.strip() for k in a.kind.split(',') if k.strip()]
    a.path_list = [p.strip() for p in a.paths.split(',') if p.strip()]
    if bad := [k for k in a.kinds if k not in ('sft', 'dpo')]: ap.error(f"--kind: {', '.join(bad)}; sft and/or dpo")
    if bad := [p for p in a.path_list if p not in PATHS]: ap.error(f"--paths: {', '.join(bad)}; any of {', '.join(PATHS)}")
    try:
        a.caps = parse_caps(a.memory_cap_gb)
        a.context_cap_list = parse_caps(a.context_caps) if a.context_caps else list(a.caps)
    except ValueError as e: ap.error(str(e))
    return a

def settings(a) -> dict:
    "Per kind: sequences per step, tokens per sequence, optimizer steps."
    return {k: {'batch_size': a.dpo_batch_size if k == 'dpo' else a.batch_size, 'max_length': a.dpo_max_length if k == 'dpo' else a.max_length,
                'steps': a.steps} for k in a.kinds}

def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None

def table(runs:list, contexts:list, peak:dict|None) -> list[dict]:
    "One row per path, kind and memory cap: status, fits, median tokens/s, largest peak memory, MFU, checkpointing, the longest context."
    rows, seen = [], []
    for r in runs:
        key = (r['path'], r.get('kind'), r.get('memory_cap_gb'))
        if key not in seen: seen.append(key)
    for p, k, c in seen:
        rs = [r for r in runs if (r['path'], r.get('kind'), r.get('memory_cap_gb')) == (p, k, c)]
        ok = [r for r in rs if r.get('status', 'ok' if 'error' not in r else 'failed') == 'ok']
        st = sorted({r.get('status', 'ok') for r in rs})
        row = {'path': p, 'kind': k, 'memory_cap_gb': c, 'status': ','.join(st),
               'fits': True if ok else (False if 'oom' in st else None), 'tokens_per_s': _median([r['tokens_per_s'] for r in ok]),
               'peak_memory_bytes': max((r['peak_memory_bytes'] for r in ok), default=None), 'runs': len(rs)}
        if ok:
            r0 = ok[0]
            row |= {'gradient_checkpointing': r0.get('gradient_checkpointing'), 'micro_batch': r0.get('micro_batch', r0.get('batch_size')),
                    'grad_accum': r0.get('grad_accum', 1), 'tokens_per_step': r0['tokens'] / max(1, r0['steps'] - 1)}
            if peak is not None: row['mfu'] = row['tokens_per_s'] * r0['flops_per_token'] / peak['flops_per_s']
            if 'plan_total_bytes' in r0: row['plan_total_bytes'] = r0['plan_total_bytes']
        else: row['why'] = next((r.get('why') or r.get('error') for r in rs if r.get('why') or r.get('error')), None)
        rows.append(row)
    return rows

def goals(rows:list, contexts:list) -> dict:
    """The issue's goals, where the numbers exist: our SFT and DPO fit under the 16 GiB cap; our tokens/s against
    Unsloth's (and peak memory against its) uncapped; our longest context under 16 GiB against plain TRL's and Unsloth's."""
    g = {}
    row = lambda p, k, c: next((r for r in rows if (r['path'], r['kind'], r['memory_cap_gb']) == (p, k, c)), None)
    for k in ('sft', 'dpo'):
        if (o := row('ours', k, 16.0)) is not None: g[f'ours_{k}_fits_16gib'] = o['fits']
        o, u = row('ours', k, None), row('unsloth', k, None)
        if o and u and o['tokens_per_s'] and u['tokens_per_s']:
            g[f'{k}_tokens_per_s_ours_over_unsloth'] = o['tokens_per_s'] / u['tokens_per_s']
            g[f'{k}_peak_memory_ours_over_unsloth'] = o['peak_memory_bytes'] / u['peak_memory_bytes']
    ctx = {c['path']: c.get('longest') for c in contexts if c.get('memory_cap_gb') == 16.0 and c.get('status') == 'ok'}
    if ctx.get('ours') is not None:
        for other in ('trl', 'unsloth'):
            if ctx.get(other): g[f'longest_context_16gib_ours_over_{other}'] = ctx['ours'] / ctx[other]
    return g

def summarize(a, runs:list, paths:list, steps:int, bs:int, L:int, installed:list, peak:dict|None, done:bool, contexts:list|None=None,
              extra:dict|None=None) -> dict:
    """The results record of the runs so far: every run, the table per path, kind and cap, the longest contexts, the goals;
    and for the first kind and first cap measured (the headline) the medians per path, ratios and MFU against `peak`."""
    contexts = contexts or []
    kinds = getattr(a, 'kinds', [a.kind])
    caps = getattr(a, 'caps', [None])
    ok = [x for x in runs if x.get('status', 'ok' if 'error' not in x else 'failed') == 'ok']
    head = [x for x in ok if x.get('kind', kinds[0]) == kinds[0] and x.get('memory_cap_gb') == (extra or {}).get('headline_cap', caps[0])]
    have = [p for p in paths if any(x['path'] == p for x in head)]
    res = {'machine': machine(), 'versions': versions(), 'installed': installed, 'shape': a.shape, 'config': SHAPES[a.shape],
           'kind': kinds[0] if len(kinds) == 1 else ','.join(kinds), 'kinds': kinds, 'quantization': a.quantization, 'peft': a.peft,
           'paths': paths, 'repeats': a.repeats, 'steps': steps, 'batch_size': bs, 'max_length': L,
           'settings': settings(a) if hasattr(a, 'kinds') else None, 'fill': bool(getattr(a, 'fill', False)),
           'memory_caps_gb': caps, 'checkpointing': getattr(a, 'checkpointing', None), 'suite': getattr(a, 'suite', None),
           'tokenizer': a.tokenizer, 'data_dir': a.data_dir, 'complete': done, 'runs': runs,
           'tokens_per_s': {p: _median([x['tokens_per_s'] for x in head if x['path'] == p]) for p in have}}
    res |= extra or {}
    tps = res['tokens_per_s']
    if {'ours', 'trl'} <= set(tps): res['ratio'] = tps['ours'] / tps['trl']
    if {'ours', 'unsloth'} <= set(tps): res['ratio_unsloth'] = tps['ours'] / tps['unsloth']
    if peak is not None:
        res['peak_flops_per_s'], res['peak_dtype'] = peak['flops_per_s'], peak['dtype']
        if head: res['mfu'] = {p: v * next(x for x in head if x['path'] == p)['flops_per_token'] / peak['flops_per_s'] for p, v in tps.items()}
    res['table'] = table(runs, contexts, peak)
    if contexts or getattr(a, 'max_context', False): res['max_context'] = contexts
    res['goals'] = goals(res['table'], contexts)
    return res

def _shares(cells:list) -> list[float]:
    """Weights of the cells in the time left: Unsloth's twice (its import and 4-bit load), its first three times (it also
    saves the model), a context search's twice."""
    first = next((i for i, c in enumerate(cells) if c['path'] == 'unsloth'), None)
    return [(3 if i == first else 2 if c['path'] == 'unsloth' else 1) * (2 if c['context'] else 1) for i, c in enumerate(cells)]

def main(argv=None) -> dict:
    """Measure the cells (per repeat, per cap, per path: each kind, and the longest context where asked); write the
    records, the table, medians, ratios and MFU as JSON after each measurement (`complete` turns true at the end)."""
    global PROGRESS
    a = _cli(argv)
    if a._cell: return _child(a._cell)
    PROGRESS = not a.quiet
    t_start = time.time()
    deadline = None if not a.deadline_s else t_start + a.deadline_s
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
    dev = device()
    say(f"device {dev}: {machine()}; {versions()}")
    paths, out = a.path_list, Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(a.tokenizer)
    data = {}
    if not a.fill:
        data = {k: cached_data(k, tok, s['max_length'], a.n_train, a.data_dir) for k, s in settings(a).items()}
        say(f"tokenizer {a.tokenizer or 'tiny Typhoon'} ({len(tok)} tokens), " + ', '.join(f"{len(d)} {k} records" for k, d in data.items())
            + f" from {a.data_dir or 'the demo curriculum'}")
    isolate = a.isolate == 'yes' or (a.isolate == 'auto' and dev == 'cuda' and (any(c is not None for c in a.caps) or 'unsloth' in paths))
    caps = a.caps if dev == 'cuda' else [None]
    runs, contexts = [], []
    if dev != 'cuda':  # a cap is a CUDA allocator setting: recorded as not applicable, the run measures once uncapped
        why = CAP_NA.format(dev=dev)
        runs += [{'path': p, 'kind': k, 'memory_cap_gb': c, 'status': 'n/a', 'fits': None, 'why': why} for c in a.caps if c is not None for p in paths for k in a.kinds]
        contexts += [{'path': p, 'kind': 'sft', 'memory_cap_gb': c, 'status': 'n/a', 'why': why} for c in a.context_cap_list if c is not None and a.max_context for p in paths]
    ctx_caps = [c for c in a.context_cap_list if c in caps]
    cells = expand_cells(paths, caps, a.kinds, ctx_caps, a.repeats, a.max_context)
    peak = None
    if not a.no_peak:
        sizes = tuple(int(x) for x in a.peak_sizes.split(',')) if a.peak_sizes else PEAK_SIZES.get(a.shape, (1024, 2048))
        peak = matmul_peak(run_dtype(), sizes)
        say(f"{peak['dtype']} matmul peak {peak['flops_per_s'] / 1e12:.2f} TFLOP/s (the precision the run computes in)")
        if dev == 'cuda': torch.cuda.empty_cache()
    base_spec = dict(shape=a.shape, quantization=a.quantization, peft=a.peft, settings=settings(a), fill=a.fill, checkpointing=a.checkpointing,
                     context_start=a.context_start, context_ceiling=a.context_ceiling, context_step=a.context_step, context_steps=a.context_steps,
                     tokenizer=a.tokenizer, data_dir=a.data_dir, n_train=a.n_train, quiet=a.quiet, threads=a.threads,
                     unsloth_dir=a.unsloth_dir or str(Path(tempfile.gettempdir()) / f'gpu_perf_unsloth_{a.shape}'))
    extra = {'isolate': isolate, 'deadline_s': a.deadline_s, 'headline_cap': caps[0], 'context': {k: base_spec[k] for k in base_spec if k.startswith('context_')}
             | {'caps': ctx_caps if a.max_context else []}}
    bs, L = a.batch_size, a.max_length
    write = lambda done, more=(), more_ctx=(): out.write_text(json.dumps(
        summarize(a, runs + list(more), paths, a.steps, bs, L, installed, peak, done, contexts + list(more_ctx), extra | {'wall_s': time.time() - t_start}),
        indent=1, default=str))
    unsloth_out = None  # why Unsloth cannot run here, once a process found out
    shares = _shares(cells)
    for i, cell in enumerate(cells):
        spec = base_spec | cell
        if cell['path'] == 'unsloth' and unsloth_out:
            res = {'records': [{'path': 'unsloth', 'kind': k, 'memory_cap_gb': cell['memory_cap_gb']} | unsloth_out for k in a.kinds],
                   'contexts': [{'path': 'unsloth', 'kind': 'sft', 'memory_cap_gb': cell['memory_cap_gb']} | unsloth_out] if cell['context'] else []}
        else:
            timeout, left = None, None
            if deadline is not None:
                left = deadline - time.time()
                share = max(0.0, left) * shares[i] / sum(shares[i:])
                spec['deadline'] = time.time() + share
                timeout = share + GRACE_S
            say(f"cell {i + 1}/{len(cells)}: {cell['path']} under cap {cell['memory_cap_gb']}" + (' (with the context search)' if cell['context'] else '')
                + (f"; {spec['deadline'] - time.time():.0f} s of the deadline" if 'deadline' in spec else ''))
            if left is not None and left < 20:
                res = {'records': [{'path': cell['path'], 'kind': k, 'memory_cap_gb': cell['memory_cap_gb'], 'status': 'skipped', 'fits': None,
                                    'why': 'out of time (--deadline_s)'} for k in a.kinds], 'contexts': []}
            elif isolate: res = run_child(spec, timeout)
            else: res = run_cell(spec, report=lambda o: write(False, o['records'], o['contexts']))
            if cell['path'] == 'unsloth' and res.get('unavailable'): unsloth_out = res['unavailable']
        runs += res['records']; contexts += res['contexts']
        write(False)
        say(f"wrote {out} ({len(runs)} run(s))")
    res = summarize(a, runs, paths, a.steps, bs, L, installed, peak, True, contexts, extra | {'wall_s': time.time() - t_start})
    out.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res.get(k) for k in ('machine', 'tokens_per_s', 'ratio', 'mfu', 'goals')}, indent=1, default=str), flush=True)
    return res

if __name__ == '__main__': main()
