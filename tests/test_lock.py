"The lock of tested versions: every requirement pinned inside its declared range, installs through it, the oldest set."
import os, re, subprocess, sys
from pathlib import Path
import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tools'))
import lock  # noqa: E402

IN_USE = os.environ.get('TYPHOON_NB_LOCK')  # the lock `make test` installed through; '' under make test-latest
needs_lock = pytest.mark.skipif(IN_USE is not None and Path(IN_USE).name != 'constraints.txt',
                                reason='this suite runs on another set than the lock (make test-latest / test-oldest)')

@needs_lock
def test_every_requirement_is_locked_inside_its_range():
    "settings.ini's ranges and the lock agree: each requirement (torch aside) has a pin, and the pin is inside the range."
    pins = lock.read_lock()
    for req in lock.requirements():
        name, spec = lock.split(req)
        if lock.UNLOCKED.match(lock.canonical(name)): continue
        assert lock.canonical(name) in pins, f"constraints.txt: no pin for {name} (settings.ini requires {req}): run make lock"
        assert Version(pins[lock.canonical(name)]) in SpecifierSet(spec), \
            f"constraints.txt: {name}=={pins[lock.canonical(name)]} is outside settings.ini's range {spec!r}: run make lock"
    assert not any(lock.UNLOCKED.match(n) for n in pins)  # torch is chosen by TORCH_SPEC

@needs_lock
def test_this_suite_runs_on_the_locked_set():
    "What make test installed is the lock, package for package: the manifest's `lock` says locked."
    from typhoon_nb.runfolder import lock_status
    st = lock_status()
    assert st['lock'] == str(ROOT / 'constraints.txt') and st['differ'] == {} and st['locked'] is True, st

def test_the_two_readme_commands_install_through_the_lock(tmp_path):
    "make demo and make test install every package with -c LOCK (constraints.txt unless told); LOCK= without it."
    assert re.search(r'^LOCK \?= constraints\.txt$', (ROOT / 'Makefile').read_text(), re.M)
    lk = tmp_path / 'lock.txt'; lk.write_text('pyyaml==6.0.3\n')
    dry = lambda *a: subprocess.run(['make', '-n', '-B', *a, f'VENV={tmp_path / "v"}'], capture_output=True, text=True, cwd=ROOT).stdout
    for target in ('demo', 'install-dev'):
        installs = [l for l in dry(target, f'LOCK={lk}').splitlines() if ' install ' in l]
        assert len(installs) >= 3 and all(l.rstrip().endswith(f'-c {lk}') for l in installs), installs
    assert not any('-c ' in l for l in dry('install-dev', 'LOCK=').splitlines() if ' install ' in l)

def test_oldest_pins_each_lower_bound(tmp_path):
    "Runtime requirements at their lower bounds (torch aside), dev tools no newer than locked."
    ini, lk = tmp_path / 'settings.ini', tmp_path / 'constraints.txt'
    ini.write_text("[DEFAULT]\nrequirements = torch>=2.4 transformers>=5.24 fastcore>=1.12.27,<2 pyyaml fastcore>=1.12.3\n"
                   "dev_requirements = fastcore>=1.12.3,<2 nbdev==2.4.14 pytest>=8.0 ghapi<2.1\n")
    lk.write_text("fastcore==1.14.5\nnbdev==2.4.14\npytest==9.2.0\nghapi==2.0.3\ntransformers==5.25.0\n")
    assert lock.oldest(ini, lk) == ['transformers==5.24', 'fastcore==1.12.27', 'nbdev<=2.4.14', 'pytest<=9.2.0', 'ghapi<=2.0.3']
    real = lock.oldest()
    assert not any(l.startswith('torch') for l in real)
    for req in lock._section(lock.ROOT / 'settings.ini', 'requirements'):
        name, spec = lock.split(req)
        if '>=' in spec and name != 'torch': assert f"{name}=={spec.split('>=')[1].split(',')[0]}" in real, (req, real)

def test_read_lock_refuses_an_unpinned_line(tmp_path):
    f = tmp_path / 'constraints.txt'
    f.write_text('# head\nPyYAML==6.0.3\npeft>=0.17\n')
    with pytest.raises(ValueError, match=r"constraints.txt: 'peft>=0.17' is not pinned with =="): lock.read_lock(f)
    f.write_text('# head\nPyYAML==6.0.3  # a comment\n')
    assert lock.read_lock(f) == {'pyyaml': '6.0.3'}
