"""Prepare `.gpu/`: everything `gpu_perf.py` needs on a GPU machine that has no network.

    python nbs/benchmarks/gpu_bundle.py --download   # writes .gpu/ in the repository root (ignored through .git/info/exclude)
    bash .gpu/run.sh                                 # on the GPU machine, from the repository root, with .gpu/ next to it

`bash .gpu/run.sh` with no arguments runs the side-by-side suite (`gpu_perf.py --suite side_by_side`: ours, plain TRL
and Unsloth at Typhoon-7B's shape, uncapped and under 24 / 16 GiB caps, with the longest context per cap; about 9
minutes on one H200 as estimated in gpu_perf.py), writing `$OUT/gpu_perf.json` and the log `$OUT/gpu_run.log`; with arguments it
runs `gpu_perf.py` with those instead (`bash .gpu/run.sh --paths ours,trl --repeats 2`: the earlier two-path check). The
one command to give the GPU machine, from the repository root with `.gpu/` beside the working tree (the two together
about 42 MiB, under the 64 MiB a device call carries; `main` prints the total):

    bash .gpu/run.sh

The GPU machine is assumed to have Python 3.12, torch (CUDA), accelerate, huggingface_hub, tokenizers, safetensors,
numpy, pandas, pyarrow, fsspec, xxhash, psutil, pyyaml, jinja2, tqdm, triton and its own transformers. `.gpu/` holds:

- `wheels/`: the packages it lacks (or has too old), installed there with `--no-deps` into /tmp/site:
  bitsandbytes, transformers, trl, datasets, dill, multiprocess, peft at the versions in `WHEELS`, copied from `.whl/`
  in the repository root; where one is missing there, `--download` fetches it with
      pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl \\
          bitsandbytes==0.50.2 transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 peft==0.21.2
  (pythainlp, tokenizers and huggingface_hub stay behind: the bundle brings what pythainlp would build, and the machine's
  own tokenizers / huggingface_hub satisfy transformers). The bitsandbytes wheel (41 MiB) carries a native library for
  every CUDA / ROCm / XPU release; the bundle rewrites it with the CPU and CUDA 13.x libraries only (7 MiB, the
  default since the repository carries the tiny Typhoon's weights: with the whole wheel it passes 64 MiB; `--full_bnb`
  keeps it whole; the machine's torch is a CUDA 13.0 build, and bitsandbytes picks the closest library of the same CUDA
  major version);
- `wheels/unsloth/`: Unsloth and what it needs beyond the machine (`UNSLOTH_WHEELS`), installed with the shared
  `UNSLOTH_SHARED` wheels of `wheels/` into /tmp/site_unsloth, the PYTHONPATH of gpu_perf's Unsloth process
  (`GPU_PERF_UNSLOTH_PYTHONPATH`): unsloth and unsloth_zoo 2026.10.9, and the TRL (1.15.0) and datasets (4.8.5)
  releases they declare (`trl<=1.15.0`, `datasets<5`); transformers is the machine's own (5.17.0 when last seen, the
  newest Unsloth declares: `transformers<=5.17.0`). The unsloth wheel (27 MiB) is mostly Unsloth Studio, a web app the
  library never imports: `slim_wheel` drops `studio/` and `unsloth_cli/` (1.9 MiB left); Unsloth's wheels come to
  6 MiB. Left out, each checked by importing Unsloth's GPU code path with it hidden (`UNSLOTH_ALLOW_CPU=1` on a CPU,
  transformers 5.17.0): xformers (a compiled wheel tied to one torch release; Unsloth uses torch's SDPA without it),
  torchao (quantization-aware training and torchao exports only), diffusers, tyro, msgspec, hf_transfer, pydantic,
  structlog, json5, nest_asyncio (Studio, vLLM, downloads). cut_cross_entropy is in (22 kB), though Unsloth turns it
  off on torch 2.8 and later;
- `tokenizer/`: the tiny Typhoon's tokenizer after `prepare_tokenizer`, exactly as `gpu_perf.tokenizer()` returns it,
  saved with `save_pretrained` (checked: the saved copy gives the same ids, pad / EOS tokens and chat template);
- `sft.jsonl`, `dpo.jsonl`: the demo curriculum's training records as the data layer gives them (prompt / completion,
  prompt / chosen / rejected; validated and normalised, not tokenized) for `gpu_perf.load_data`'s seed (checked: loading
  the file through the data layer, `StageConfig(data='sft.jsonl')`, gives the same records as `demo:sft`);
- `run.sh`: installs the wheels (Unsloth's into their own folder), prints the versions and `nvidia-smi`, runs
  `gpu_perf.py --no_install --tokenizer .gpu/tokenizer --data_dir .gpu` with its own arguments, or `--suite side_by_side`
  when it has none, so the run needs neither pythainlp nor the tiny Typhoon build;
- `bundle.json`: what was written (files, bytes, records, checks).
"""
from __future__ import annotations
import argparse, json, os, shutil, stat, subprocess, sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
WHEELS = {'bitsandbytes': '0.50.2', 'transformers': '5.24.0', 'trl': '1.16.0', 'datasets': '5.2.0', 'dill': '0.4.1',
          'multiprocess': '0.70.19', 'peft': '0.21.2'}
UNSLOTH_WHEELS = {'unsloth': '2026.10.9', 'unsloth_zoo': '2026.10.9', 'trl': '1.15.0', 'datasets': '4.8.5', 'cut_cross_entropy': '25.1.1'}
UNSLOTH_SHARED = ('bitsandbytes', 'peft', 'dill', 'multiprocess')  # wheels of WHEELS installed into Unsloth's folder too
SLIM_UNSLOTH = ('studio/', 'unsloth_cli/')  # Unsloth Studio (a web app) and its command line: not imported by the library
PIP_INSTALL = 'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/wheels/*.whl'
PIP_INSTALL_UNSLOTH = ('python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_unsloth '
                       '.gpu/wheels/unsloth/*.whl ' + ' '.join(f'.gpu/wheels/{n}-*.whl' for n in UNSLOTH_SHARED))

def find_wheel(folder:Path, name:str, version:str) -> Path|None:
    "The wheel of `name`==`version` in `folder` (a Python 3.12 / manylinux x86_64 one where several exist), or None."
    hits = sorted(Path(folder).glob(f"{name.replace('-', '_')}-{version}-*.whl")) if Path(folder).is_dir() else []
    ok = [h for h in hits if any(t in h.name for t in ('py3-none', 'py312', 'cp312', 'abi3')) and ('any' in h.name or 'x86_64' in h.name)]
    return (ok or hits or [None])[0]

def copy_wheels(dest:Path, src:Path=ROOT / '.whl', download:bool=False, slim_bnb:bool=False, table:dict|None=None) -> list[Path]:
    """Copy the wheels of `table` (default `WHEELS`) from `src` into `dest` (fetching missing ones into `src` with pip
    download when `download`); bitsandbytes through `slim_wheel` when `slim_bnb`, unsloth always without `SLIM_UNSLOTH`."""
    table = WHEELS if table is None else table
    missing = [f'{n}=={v}' for n, v in table.items() if find_wheel(src, n, v) is None]
    if missing and download:
        subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '--python-version', '3.12',
                        '--platform', 'manylinux_2_24_x86_64', '-d', str(src), *missing], check=True)
        missing = [f'{n}=={v}' for n, v in table.items() if find_wheel(src, n, v) is None]
    if missing: raise FileNotFoundError(f"{src}: no wheel for {', '.join(missing)} (run with --download, or see the pip download command in {Path(__file__).name})")
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob('*.whl'): old.unlink()
    out = []
    for n, v in table.items():
        w = find_wheel(src, n, v)
        if slim_bnb and n == 'bitsandbytes': out.append(slim_wheel(w, dest)); continue
        if n == 'unsloth': out.append(slim_wheel(w, dest, drop=lambda name: name.startswith(SLIM_UNSLOTH))); continue
        shutil.copy2(w, dest / w.name); out.append(dest / w.name)
    return out

SLIM_KEEP = ('cpu', 'cuda130', 'cuda132')  # native libraries kept by `slim_wheel`

def slim_wheel(src:Path, dest:Path, keep=SLIM_KEEP, drop=None) -> Path:
    """Copy the wheel `src` into the folder `dest` without the files `drop(name)` names (default: the bitsandbytes
    native libraries other than `keep`); their RECORD lines go too, so pip installs it as usual. Return the new wheel's path."""
    import re, zipfile
    lib = re.compile(r'bitsandbytes/libbitsandbytes_(\w+?)\.(so|dll|dylib)$')
    drop = drop or (lambda name: (m := lib.search(name)) is not None and m.group(1) not in keep)
    out = Path(dest) / Path(src).name
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out, 'w', zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop(info.filename): continue
            data = zin.read(info)
            if info.filename.endswith('.dist-info/RECORD'):
                data = ''.join(l for l in data.decode().splitlines(True) if not drop(l.split(',')[0])).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    return out

def save_tokenizer(dest:Path) -> dict:
    "Save `gpu_perf.tokenizer()` into `dest`; check that the saved copy, loaded as `gpu_perf.tokenizer(dest)` loads it, is the same."
    import gpu_perf as g
    tok = g.tokenizer()
    tok.save_pretrained(str(dest))
    back = g.tokenizer(dest)
    sample = [{'role': 'user', 'content': 'สวัสดีครับ 123 กี่บาท'}, {'role': 'assistant', 'content': 'หนึ่งร้อยยี่สิบสามบาท'}]
    for what, f in (('vocabulary', lambda t: t.get_vocab()), ('pad token', lambda t: (t.pad_token, t.pad_token_id)),
                    ('EOS token', lambda t: (t.eos_token, t.eos_token_id)), ('chat template', lambda t: t.chat_template),
                    ('ids of a chat', lambda t: t.apply_chat_template(sample, tokenize=True, return_dict=False)),
                    ('ids of a text', lambda t: t('ราคา 1,250 บาท')['input_ids'])):
        if f(tok) != f(back): raise RuntimeError(f"{dest}: the saved tokenizer differs from gpu_perf.tokenizer() in its {what}")
    return {'tokens': len(tok), 'pad_token_id': tok.pad_token_id, 'eos_token_id': tok.eos_token_id}

def write_data(dest:Path, seed:int|None=None) -> dict:
    """Write the demo curriculum's sft / dpo training records into `dest/<kind>.jsonl`; check that the data layer reads
    each file back to the same records. Returns the record counts."""
    import gpu_perf as g
    from typhoon_nb.config import StageConfig
    from typhoon_nb.data import load_stage_data
    seed = g.DATA_SEED if seed is None else seed
    dest.mkdir(parents=True, exist_ok=True)
    counts = {}
    for kind in ('sft', 'dpo'):
        recs = load_stage_data(StageConfig(kind=kind, data=f'demo:{kind}'), seed=seed).train.to_list()
        path = dest / f'{kind}.jsonl'
        path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in recs), encoding='utf-8')
        back = load_stage_data(StageConfig(kind=kind, data=str(path)), seed=seed).train.to_list()
        if back != recs:
            i = next((i for i, (a, b) in enumerate(zip(recs, back)) if a != b), min(len(recs), len(back)))
            raise RuntimeError(f"{path}: the data layer reads {len(back)} records, demo:{kind} has {len(recs)}; first difference at record {i + 1}")
        counts[kind] = len(recs)
    return counts

RUN_SH = r'''#!/usr/bin/env bash
# Typhoon-7B-shape QLoRA checks on one GPU without network (nbs/benchmarks/gpu_perf.py). Run from the repository root
# with .gpu/ in it:
#   bash .gpu/run.sh                                    # the side-by-side suite: ours, plain TRL, Unsloth; SFT and DPO;
#                                                       # uncapped, 24 and 16 GiB caps; longest context; < 9 minutes
#   bash .gpu/run.sh --paths ours,trl --repeats 2       # gpu_perf.py with these options instead (7b, 4bit, lora, SFT)
# Results: $OUT/gpu_perf.json where $OUT is set (else ./gpu_perf.json), rewritten after each measurement; the log goes
# to $OUT/gpu_run.log too. Written by nbs/benchmarks/gpu_bundle.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; exec > >(tee -a "$OUT/gpu_run.log") 2>&1; fi
ts() { echo "[$(date +%H:%M:%S)] $*"; }
ts "installing $(ls .gpu/wheels/*.whl | wc -l) wheels into /tmp/site"
if python3 -m pip --version >/dev/null 2>&1; then
  @PIP_INSTALL@ || { ts "pip install failed"; exit 1; }
else  # no pip: a wheel is a zip of the installed files
  ts "no pip here: unpacking the wheels"
  python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site') for w in sys.argv[1:]]" .gpu/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
if [ -d .gpu/wheels/unsloth ]; then  # Unsloth with the TRL and datasets it supports, beside the machine's transformers
  ts "installing $(ls .gpu/wheels/unsloth/*.whl | wc -l) + @N_SHARED@ wheels into /tmp/site_unsloth (Unsloth's process)"
  if python3 -m pip --version >/dev/null 2>&1; then
    @PIP_INSTALL_UNSLOTH@ || ts "Unsloth's install failed: its measurements will say why"
  else
    python3 -c "import sys, zipfile; [zipfile.ZipFile(w).extractall('/tmp/site_unsloth') for w in sys.argv[1:]]" .gpu/wheels/unsloth/*.whl @SHARED@
  fi
  export GPU_PERF_UNSLOTH_PYTHONPATH=/tmp/site_unsloth:$PWD
  PYTHONPATH=$GPU_PERF_UNSLOTH_PYTHONPATH python3 -c "from importlib.metadata import version as v; print('Unsloth process:', ', '.join(f'{n} {v(n)}' for n in ('unsloth', 'unsloth_zoo', 'transformers', 'trl', 'datasets', 'peft', 'bitsandbytes')))" \
    || ts "Unsloth's packages are incomplete"
fi
ts "installed"
python3 -m pip show torch transformers trl peft bitsandbytes accelerate datasets tokenizers huggingface_hub safetensors pyarrow fsspec 2>/dev/null \
  | grep -E '^(Name|Version|Location):' | paste - - - | sed 's/\t/  /g'
nvidia-smi || ts "nvidia-smi failed"
if ! python3 -c "import transformers" 2>/tmp/transformers_import.err; then
  tail -3 /tmp/transformers_import.err
  ts "the bundled transformers does not import with this machine's packages: using the machine's own"
  rm -rf /tmp/site/transformers /tmp/site/transformers-*.dist-info
fi
python3 -c "import torch, transformers, peft, trl, datasets, bitsandbytes as b; print('imports ok: torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__, '| bitsandbytes', b.__version__)" || exit 1
[ $# -eq 0 ] && set -- --suite side_by_side
ts "gpu_perf.py starts: $*"
python3 nbs/benchmarks/gpu_perf.py --no_install --tokenizer .gpu/tokenizer --data_dir .gpu "$@"
rc=$?
ts "gpu_perf.py finished (exit $rc)"
exit $rc
'''.replace('@PIP_INSTALL@', PIP_INSTALL).replace('@PIP_INSTALL_UNSLOTH@', PIP_INSTALL_UNSLOTH).replace(
    '@SHARED@', ' '.join(f'.gpu/wheels/{n}-*.whl' for n in UNSLOTH_SHARED)).replace('@N_SHARED@', str(len(UNSLOTH_SHARED)))

def write_run_sh(dest:Path) -> Path:
    p = dest / 'run.sh'
    p.write_text(RUN_SH)
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p

def exclude_in_git(pattern:str='/.gpu/', root:Path=ROOT) -> bool:
    "Add `pattern` to the repository's .git/info/exclude (local, not .gitignore) unless it is there; return whether it was added."
    cp = subprocess.run(['git', 'rev-parse', '--git-path', 'info/exclude'], cwd=root, capture_output=True, text=True)
    if cp.returncode: return False
    f = Path(cp.stdout.strip()); f = f if f.is_absolute() else root / f
    lines = f.read_text().splitlines() if f.exists() else []
    if pattern in lines: return False
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text('\n'.join(lines + [pattern]) + '\n')
    return True

def tree_bytes(folder:Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob('*') if f.is_file())

def tracked_bytes(root:Path=ROOT) -> int:
    "Bytes of the files git tracks in `root` (the working tree that travels with the bundle)."
    names = subprocess.run(['git', 'ls-files', '-z'], cwd=root, capture_output=True).stdout.decode().split('\0')
    return sum((root / f).stat().st_size for f in names if f and (root / f).is_file())

def make_bundle(dest:Path=ROOT / '.gpu', wheels_from:Path=ROOT / '.whl', wheels:bool=True, download:bool=False,
                slim_bnb:bool=True, unsloth:bool=True) -> dict:
    "Write the bundle into `dest` (see the module docstring); return what `bundle.json` records."
    dest = Path(dest); dest.mkdir(parents=True, exist_ok=True)
    info = {'wheels': [w.name for w in copy_wheels(dest / 'wheels', Path(wheels_from), download, slim_bnb)] if wheels else [],
            'slim_bnb': slim_bnb}
    uw = dest / 'wheels' / 'unsloth'
    if wheels and unsloth: info['unsloth_wheels'] = [w.name for w in copy_wheels(uw, Path(wheels_from), download, table=UNSLOTH_WHEELS)]
    elif uw.exists(): shutil.rmtree(uw)  # an earlier bundle's: run.sh would install it
    info['tokenizer'] = save_tokenizer(dest / 'tokenizer')
    info['records'] = write_data(dest)
    write_run_sh(dest)
    info['bytes'] = {p.name: (tree_bytes(p) if p.is_dir() else p.stat().st_size) for p in sorted(dest.iterdir()) if p.name != 'bundle.json'}
    info['total_bytes'] = sum(info['bytes'].values())
    (dest / 'bundle.json').write_text(json.dumps(info, indent=1) + '\n')
    return info

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--dest', default=str(ROOT / '.gpu'), help='bundle folder (default: .gpu in the repository root)')
    ap.add_argument('--wheels_from', default=str(ROOT / '.whl'), help='folder holding the downloaded wheels')
    ap.add_argument('--no_wheels', action='store_true', help='tokenizer, data and run.sh only')
    ap.add_argument('--download', action='store_true', help='pip download the wheels missing from --wheels_from')
    ap.add_argument('--full_bnb', action='store_true', help=f"bitsandbytes with every native library (default: the {', '.join(SLIM_KEEP)} ones only)")
    ap.add_argument('--no_unsloth', action='store_true', help="leave Unsloth's wheels out (its path is then recorded as not installed)")
    a = ap.parse_args(argv)
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    dest = Path(a.dest).resolve()
    if dest == (ROOT / '.gpu').resolve() and exclude_in_git(): print('added /.gpu/ to .git/info/exclude')
    info = make_bundle(dest, Path(a.wheels_from), not a.no_wheels, a.download, not a.full_bnb, not a.no_unsloth)
    repo = tracked_bytes()
    print(f"{dest}: {info['total_bytes'] / 2**20:.1f} MiB ({', '.join(f'{k} {v / 2**20:.1f} MiB' for k, v in info['bytes'].items())}); "
          f"with the repository's tracked files ({repo / 2**20:.1f} MiB): {(info['total_bytes'] + repo) / 2**20:.1f} MiB carried")
    print(f"records: {info['records']}; tokenizer: {info['tokenizer']}")
    print(f"on the GPU machine, from the repository root: bash {os.path.relpath(dest / 'run.sh', ROOT)}")
    return info

if __name__ == '__main__': main()
