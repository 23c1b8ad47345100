"""The lock of tested versions (`constraints.txt`) and the oldest versions `settings.ini` allows.

    python tools/lock.py oldest [settings.ini [LOCK]]   the runtime requirements at their lower bounds, dev tools no newer than locked
    python tools/lock.py freeze VENV_PYTHON [OUT]       write the lock from a venv in which the suite passed

`make lock` runs `freeze` after `make test-latest` passed; `make test-oldest` installs through `oldest`. torch is left
out of both: the Makefile's TORCH_SPEC chooses the build (the CPU wheel here, a CUDA build on a GPU machine).
"""
from __future__ import annotations
import configparser, datetime, platform, re, shlex, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / 'constraints.txt'
UNLOCKED = re.compile(r'^(torch|triton|nvidia-.*|typhoon-nb)$')  # chosen by TORCH_SPEC, or this package itself

def canonical(name:str) -> str:
    "A distribution name as pip compares them (PEP 503)."
    return re.sub(r'[-_.]+', '-', name).lower()

def requirements(settings=ROOT / 'settings.ini') -> list[str]:
    "The runtime and dev requirements of `settings.ini`, as written there."
    c = configparser.ConfigParser(delimiters=['=']); c.read(settings, encoding='utf-8')
    return shlex.split(c['DEFAULT'].get('requirements', '')) + shlex.split(c['DEFAULT'].get('dev_requirements', ''))

def split(req:str) -> tuple[str, str]:
    "('name', 'specifier') of a requirement such as 'fastcore>=1.12.3,<2'."
    m = re.match(r'^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$', req)
    if not m: raise ValueError(f"settings.ini: cannot read the requirement {req!r}")
    return m.group(1), m.group(3).strip()

def _section(settings, key) -> list[str]:
    c = configparser.ConfigParser(delimiters=['=']); c.read(settings, encoding='utf-8')
    return shlex.split(c['DEFAULT'].get(key, ''))

def oldest(settings=ROOT / 'settings.ini', lock=LOCK) -> list[str]:
    """Constraints of `make test-oldest`: each runtime requirement with a lower bound (`>=`, `==`) pinned to it, torch
    left out; each dev tool (nbdev, pytest, ...) that is not a runtime requirement capped at its version in the lock
    (the range users install is the runtime one; the dev tools are what `make test` installs: no newer than tested,
    and older where the runtime bounds need it)."""
    from packaging.version import Version
    bounds = {}  # a name required twice takes the higher of its bounds
    for r in _section(settings, 'requirements'):
        name, spec = split(r)
        lo = re.search(r'(?:>=|==)\s*([^,\s]+)', spec)
        if lo is None or UNLOCKED.match(canonical(name)): continue
        old = bounds.get(canonical(name))
        if old is None or Version(lo.group(1)) > Version(old[1]): bounds[canonical(name)] = (name, lo.group(1))
    pins = read_lock(lock) if Path(lock).is_file() else {}
    for r in _section(settings, 'dev_requirements'):
        name, _ = split(r)
        if canonical(name) not in bounds and canonical(name) in pins: bounds[canonical(name)] = (name, pins[canonical(name)], '<=')
    return [f'{b[0]}{b[2] if len(b) > 2 else "=="}{b[1]}' for b in bounds.values()]

def read_lock(path=LOCK) -> dict[str, str]:
    "{canonical name: version} of a lock file."
    out = {}
    for line in Path(path).read_text(encoding='utf-8').splitlines():
        line = line.split('#', 1)[0].strip()
        if not line: continue
        name, _, ver = line.partition('==')
        if not ver: raise ValueError(f"{path}: {line!r} is not pinned with ==")
        out[canonical(name)] = ver.strip()
    return out

def freeze(python:str, out=LOCK) -> Path:
    "Write the lock from the packages installed in the venv of `python` (pip freeze), torch and this package left out."
    lines = subprocess.run([python, '-m', 'pip', 'freeze', '--all', '--exclude-editable'], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    pins = sorted((l for l in lines if '==' in l and not UNLOCKED.match(canonical(l.split('==')[0]))), key=lambda l: canonical(l))
    ver = subprocess.run([python, '-c', 'import platform; print(platform.python_version())'], capture_output=True, text=True).stdout.strip()
    head = [f"# The versions `make test` last passed with (`make lock` on {datetime.date.today()}, Python {ver}, {platform.machine()}).",
            "# `make demo` and `make test` install through this file; settings.ini keeps the ranges for `pip install`.",
            "# Move it forward with `make lock`: it installs the newest releases, runs the suite, and rewrites this file only",
            "# when the suite passes. torch is not here: TORCH_SPEC in the Makefile chooses the build."]
    tmp = Path(str(out) + '.tmp')
    tmp.write_text('\n'.join(head + pins) + '\n', encoding='utf-8'); tmp.replace(out)
    return Path(out)

if __name__ == '__main__':
    cmd, args = (sys.argv[1] if len(sys.argv) > 1 else ''), sys.argv[2:]
    if cmd == 'oldest': print('\n'.join(oldest(*args)))
    elif cmd == 'freeze' and args: print(freeze(*args))
    else: sys.exit(__doc__)
