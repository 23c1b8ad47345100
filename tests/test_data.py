"Data: the bad-input catalogue (error and skip policies), round trips of every format, the demo curriculum's guarantees."
import csv, hashlib, json
from pathlib import Path
import pytest
import datasets
from typhoon_nb.config import StageConfig
from typhoon_nb.data import DataError, load_records, load_stage_data, normalize_thai, pack_dataset, padding_report, tokenizer_stats
from typhoon_nb.curriculum import demo_curriculum, demo_task, heldout_numbers, numbers_in, is_polite, strip_polite, POLITE_PARTICLES

datasets.disable_progress_bars()
U = lambda t: {'role': 'user', 'content': t}
A = lambda t: {'role': 'assistant', 'content': t}
S = lambda t: {'role': 'system', 'content': t}


@pytest.fixture(scope='module')
def tok():
    "A small byte-level BPE with a chat template, trained on the curriculum's text."
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE()); t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); t.decoder = decoders.ByteLevel()
    texts = [r['text'] for r in demo_curriculum(seed=0, n_pretrain=500, n_sft=50, n_dpo=50, n_eval=20)['pretrain_train']]
    t.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, special_tokens=['<s>', '</s>', '<unk>', '<pad>'], show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk = PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<s>', eos_token='</s>', unk_token='<unk>', pad_token='<pad>')
    tk.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    return tk


# ---------------------------------------------------------------------------------------------------------------
# writers for the bad-input files (written into tmp_path at run time)

def jl(*recs) -> bytes: return b''.join((r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode()) + b'\n' for r in recs)
def pq(rows):
    def w(p): datasets.Dataset.from_list(rows).to_parquet(str(p))
    return w
def csv_rows(rows) -> bytes:
    import io
    s = io.StringIO(); csv.writer(s).writerows(rows); return s.getvalue().encode()

GOOD_SFT = {'prompt': 'แปลง 12 เป็นเลขไทย', 'completion': '๑๒'}
GOOD_DPO = {'prompt': 'แปลง 12 เป็นเลขไทย', 'chosen': '๑๒ ครับ', 'rejected': '๑๒'}
GOOD_MSG = {'messages': [U('12 บวก 3 เท่ากับเท่าไร'), A('15')]}

def mixed_folder(p):
    p.mkdir()
    (p/'a.jsonl').write_bytes(jl(GOOD_MSG, {'messages': [S('ตอบสั้น'), U('q'), A('a')]}))
    (p/'b.csv').write_bytes(csv_rows([['instruction', 'input', 'output'], ['แปลง 7 เป็นเลขไทย', '', '๗'], ['บวก', '1 กับ 2', '3']]))
    pq([GOOD_SFT, {'prompt': 'q2', 'completion': 'a2'}])(p/'c.parquet')
    (p/'notes.md').write_text('# about this data\n')

# (id, kind, file name, content (bytes or writer), stage extras, error message, skip: (read, kept, rejected) or a message when skip raises too)
CASES = [
    ('invalid_json', 'sft', 'bad.jsonl', jl(GOOD_SFT, b'{"prompt": "q", "completion": }', GOOD_SFT), {},
     'bad.jsonl line 2: invalid JSON (Expecting value at column 31)', (3, 2, {'invalid_json': 1})),
    ('missing_field', 'dpo', 'train.jsonl', jl(GOOD_DPO, GOOD_DPO, {'prompt': 'q', 'rejected': 'a'}), {},
     "train.jsonl line 3: field 'chosen': missing", (3, 2, {'missing_field': 1})),
    ('wrong_type', 'dpo', 'bad.jsonl', jl({'prompt': 'q', 'chosen': 5, 'rejected': 'a'}, GOOD_DPO), {},
     "bad.jsonl line 1: field 'chosen': expected a string or a list of messages, got int 5", (2, 1, {'wrong_type': 1})),
    ('empty_text', 'pretrain', 'bad.jsonl', jl({'text': 'ราคา 5 บาท'}, {'text': '   '}, {'text': 'ห้าบาท'}), {},
     "bad.jsonl line 2: field 'text': empty text", (3, 2, {'empty_text': 1})),
    ('empty_after_normalisation', 'pretrain', 'bad.jsonl', jl({'text': '\u200b\u200c'}, {'text': 'ห้าบาท'}), {},
     "bad.jsonl line 1: field 'text': empty text", (2, 1, {'empty_text': 1})),
    ('non_utf8', 'sft', 'bad.jsonl', jl(GOOD_SFT, b'{"prompt": "q\xff", "completion": "a"}', GOOD_SFT), {},
     'bad.jsonl line 2: not valid UTF-8 (byte 0xff at column 14)', (3, 2, {'non_utf8': 1})),
    ('roles_out_of_order', 'sft', 'bad.jsonl', jl(GOOD_MSG, {'messages': [U('q'), U('again'), A('a')]}), {},
     "bad.jsonl line 2: field 'messages': message 2: role 'user' where 'assistant' was expected", (2, 1, {'role_order': 1})),
    ('system_not_first', 'sft', 'bad.jsonl', jl({'messages': [U('q'), S('be brief'), A('a')]}, GOOD_MSG), {},
     "bad.jsonl line 1: field 'messages': message 2: role 'system' where 'assistant' was expected", (2, 1, {'role_order': 1})),
    ('no_assistant_turn', 'sft', 'bad.jsonl', jl(GOOD_MSG, GOOD_MSG, {'messages': [S('s'), U('q')]}), {},
     "bad.jsonl line 3: field 'messages': no assistant turn", (3, 2, {'no_assistant': 1})),
    ('ends_after_assistant', 'sft', 'bad.jsonl', jl({'messages': [U('q'), A('a'), U('and?')]}, GOOD_MSG), {},
     "bad.jsonl line 1: field 'messages': the last turn (message 3) is 'user', expected 'assistant'", (2, 1, {'role_order': 1})),
    ('unknown_role', 'sft', 'bad.jsonl', jl({'conversations': [{'from': 'human', 'value': 'q'}, {'from': 'robot', 'value': 'a'}]}, GOOD_MSG), {},
     "bad.jsonl line 1: field 'conversations': message 2: role 'robot' unknown", (2, 1, {'bad_role': 1})),
    ('chosen_equals_rejected', 'dpo', 'bad.jsonl', jl(GOOD_DPO, {'prompt': 'q', 'chosen': 'a ครับ', 'rejected': 'a ครับ'}), {},
     "bad.jsonl line 2: field 'rejected': same as 'chosen'", (2, 1, {'chosen_equals_rejected': 1})),
    ('chosen_equals_rejected_after_normalisation', 'dpo', 'bad.jsonl', jl({'prompt': 'q', 'chosen': 'แปลก', 'rejected': 'เเปลก'}, GOOD_DPO), {},
     "bad.jsonl line 1: field 'rejected': same as 'chosen'", (2, 1, {'chosen_equals_rejected': 1})),
    ('over_max_length', 'sft', 'bad.jsonl', jl(GOOD_SFT, {'prompt': 'ราคา 345 บาท อ่านว่า ' * 8, 'completion': 'สามร้อยสี่สิบห้าบาท'}), {'max_length': 60},
     "bad.jsonl line 2: field 'completion': prompt + completion is", (2, 1, {'too_long': 1})),
    ('bom', 'dpo', 'bad.jsonl', b'\xef\xbb\xbf' + jl(GOOD_DPO, {'prompt': 'q', 'chosen': 'a', 'rejected': None}), {},
     "bad.jsonl line 2: field 'rejected': null", (2, 1, {'null_field': 1})),
    ('crlf', 'sft', 'bad.jsonl', jl(GOOD_SFT, GOOD_SFT).replace(b'\n', b'\r\n') + b'{"prompt": "q"}\r\n', {},
     "bad.jsonl line 3: field 'completion': missing", (3, 2, {'missing_field': 1})),
    ('truncated_last_line', 'sft', 'bad.jsonl', jl(GOOD_SFT, GOOD_SFT) + b'{"prompt": "q", "compl', {},
     'bad.jsonl line 3: invalid JSON (Unterminated string starting at column 17); the file ends inside this line (truncated?)', (3, 2, {'invalid_json': 1})),
    ('parquet_nulls', 'dpo', 'bad.parquet', pq([GOOD_DPO, {'prompt': 'q', 'chosen': 'a ครับ', 'rejected': None}, GOOD_DPO]), {},
     "bad.parquet row 2: field 'rejected': null", (3, 2, {'null_field': 1})),
    ('empty_file', 'sft', 'bad.jsonl', b'', {}, 'bad.jsonl: no records (empty file or folder)', 'no records'),
    ('blank_lines_only', 'pretrain', 'bad.txt', b'\n\n  \n', {}, 'bad.txt: no records (empty file or folder)', 'no records'),
    ('mixed_folder', 'sft', 'mixed', mixed_folder, {},
     "mixed/notes.md: unsupported file type '.md'", (7, 6, {'unsupported_file': 1})),
    ('hub_id_offline', 'sft', None, 'someone/thai-sft', {},
     "hub dataset 'someone/thai-sft' cannot be loaded (offline: HF_HUB_OFFLINE is set)", 'data: thai-sft.jsonl'),
    ('file_not_found', 'sft', None, 'nope/train.jsonl', {}, 'nope/train.jsonl: file or folder not found', 'file or folder not found'),
    ('csv_short_row', 'sft', 'bad.csv', csv_rows([['instruction', 'output'], ['แปลง 7 เป็นเลขไทย', '๗'], ['แปลง 8 เป็นเลขไทย']]), {},
     "bad.csv line 3: field 'output': missing", (2, 1, {'missing_field': 1})),
    ('csv_long_row', 'sft', 'bad.csv', csv_rows([['instruction', 'output'], ['a', 'b', 'c'], ['แปลง 7 เป็นเลขไทย', '๗']]), {},
     'bad.csv line 2: 3 values for 2 columns', (2, 1, {'not_record': 1})),
    ('csv_non_utf8', 'sft', 'bad.csv', b'instruction,output\nq,\xe0\xb8\n' + csv_rows([['q', 'a']]), {},
     "bad.csv line 2: field 'output': not valid UTF-8", (2, 1, {'non_utf8': 1})),
    ('json_not_object', 'sft', 'bad.json', json.dumps([GOOD_SFT, 'oops', GOOD_SFT]).encode(), {},
     "bad.json record 2: expected a record (a JSON object), got str 'oops'", (3, 2, {'not_record': 1})),
    ('json_invalid', 'sft', 'bad.json', b'[\n {"prompt": "q", "completion": "a"},\n {"prompt": "q" "completion": "a"}\n]', {},
     "bad.json line 3: invalid JSON (Expecting ',' delimiter at column 17)", 'none of the 1 records is usable'),
    ('column_mapping_missing', 'dpo', 'prefs.jsonl', jl({'question': 'q', 'good': 'a ครับ', 'bad': 'a'}, {'question': 'q', 'good': 'a ครับ'}),
     {'columns': {'question': 'prompt', 'good': 'chosen', 'bad': 'rejected'}},
     "prefs.jsonl line 2: field 'rejected' (column 'bad'): missing", (2, 1, {'missing_field': 1})),
    ('no_sft_fields', 'sft', 'bad.jsonl', jl({'question': 'q', 'answer': 'a'}, GOOD_SFT), {},
     'bad.jsonl line 1: no SFT fields (expected messages, conversations, instruction/output or prompt/completion; found question, answer', (2, 1, {'missing_field': 1})),
    ('txt_for_sft', 'sft', 'bad.txt', 'บรรทัดหนึ่ง\n'.encode(), {},
     'bad.txt: plain text holds pretraining text only; sft data needs records', 'none of the 1 records is usable'),
    ('txt_non_utf8', 'pretrain', 'bad.txt', 'ราคา 5 บาท\n'.encode() + b'\xff\xfe\n' + 'ห้าบาท\n'.encode(), {},
     'bad.txt line 2: not valid UTF-8 (byte 0xff at column 1)', (3, 2, {'non_utf8': 1})),
    ('prompt_ends_with_assistant', 'dpo', 'bad.jsonl', jl({'prompt': [U('q'), A('a')], 'chosen': 'b ครับ', 'rejected': 'b'}, GOOD_DPO), {},
     "bad.jsonl line 1: field 'prompt': the last turn (message 2) is 'assistant', expected 'user'", (2, 1, {'role_order': 1})),
]


def _source(tmp_path, fname, content):
    if fname is None: return content  # a hub id or a missing path, as given
    p = tmp_path/fname
    if callable(content): content(p)
    else: p.write_bytes(content)
    return str(p)


def test_catalogue_size(): assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_error(case, tmp_path, tok):
    cid, kind, fname, content, extra, msg, _ = case
    stage = StageConfig(kind=kind, data=_source(tmp_path, fname, content), name='s1', on_bad_record='error', **extra)
    with pytest.raises(DataError) as e: load_stage_data(stage, run_dir=tmp_path/'run', tokenizer=tok)
    assert msg in str(e.value), str(e.value)
    assert not (tmp_path/'run'/'rejects').exists()  # the error policy writes nothing


@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_bad_input_skip(case, tmp_path, tok):
    cid, kind, fname, content, extra, msg, want = case
    stage = StageConfig(kind=kind, data=_source(tmp_path, fname, content), name='s1', on_bad_record='skip', **extra)
    if isinstance(want, str):  # nothing usable: skip cannot help either
        with pytest.raises(DataError) as e: load_stage_data(stage, run_dir=tmp_path/'run', tokenizer=tok)
        assert want in str(e.value), str(e.value)
        return
    sd = load_stage_data(stage, run_dir=tmp_path/'run', tokenizer=tok)
    r = sd.report
    assert (r.read, r.kept, r.rejected) == want
    assert len(sd.train) == r.kept and r.read == r.kept + r.n_rejected
    rej = tmp_path/'run'/'rejects'/'s1.jsonl'
    assert r.rejects_path == str(rej)
    lines = [json.loads(l) for l in rej.read_text(encoding='utf-8').splitlines()]
    assert [l['reason'] for l in lines] == [k for k, n in want[2].items() for _ in range(n)]
    assert msg in lines[0]['message']
    assert lines[0]['record'] is not None or lines[0]['raw'] is not None or lines[0]['where'] == ''


def test_bom_and_crlf_are_noted_and_clean(tmp_path):
    p = tmp_path/'ok.jsonl'
    p.write_bytes(b'\xef\xbb\xbf' + jl(GOOD_SFT, GOOD_MSG).replace(b'\n', b'\r\n'))
    ds, rep = load_records(p, 'sft')
    assert (rep.read, rep.kept) == (2, 2)
    assert ds[0] == {'prompt': [U('แปลง 12 เป็นเลขไทย')], 'completion': [A('๑๒')]}
    assert 'ok.jsonl: UTF-8 byte-order mark removed' in rep.notes and 'ok.jsonl: CRLF line ends read as LF' in rep.notes


def test_error_lists_first_problems_and_total(tmp_path):
    p = tmp_path/'many.jsonl'
    p.write_bytes(jl(*([GOOD_DPO] * 5 + [{'prompt': 'q', 'chosen': 'a'}] * 15)))
    with pytest.raises(DataError) as e: load_records(p, 'dpo', max_problems=10)
    s = str(e.value)
    assert s.startswith('15 bad records in ') and '(20 read); the first 10:' in s
    assert s.count("field 'rejected': missing") == 10 and 'many.jsonl line 6:' in s and 'many.jsonl line 16:' not in s
    assert e.value.total == 15 and len(e.value.problems) == 10
    assert (e.value.report.read, e.value.report.kept, e.value.report.rejected) == (20, 5, {'missing_field': 15})


# ---------------------------------------------------------------------------------------------------------------
# round trips: every format into every stage's schema

def _write(p:Path, rows):
    ext = p.suffix
    if ext == '.jsonl': p.write_bytes(jl(*rows))
    elif ext == '.json': p.write_text(json.dumps(rows, ensure_ascii=False), encoding='utf-8')
    elif ext == '.parquet': datasets.Dataset.from_list(rows).to_parquet(str(p))
    elif ext == '.csv':
        keys = list(rows[0])
        p.write_bytes(csv_rows([keys] + [[json.dumps(r[k], ensure_ascii=False) if isinstance(r[k], list) else r[k] for k in keys] for r in rows]))
    return p

SFT_IN = {
    'messages': ([{'messages': [S('ตอบสั้น'), U('q1'), A('a1')]}, {'messages': [U('q2'), A('x'), U('q3'), A('a3')]}],
                 [{'prompt': [S('ตอบสั้น'), U('q1')], 'completion': [A('a1')]}, {'prompt': [U('q2'), A('x'), U('q3')], 'completion': [A('a3')]}]),
    'sharegpt': ([{'conversations': [{'from': 'system', 'value': 's'}, {'from': 'human', 'value': 'q'}, {'from': 'gpt', 'value': 'a'}]}],
                 [{'prompt': [S('s'), U('q')], 'completion': [A('a')]}]),
    'alpaca': ([{'instruction': 'แปล', 'input': 'cat', 'output': 'แมว'}, {'instruction': 'นับ', 'input': '', 'output': 'หนึ่ง'}],
               [{'prompt': [U('แปล\n\ncat')], 'completion': [A('แมว')]}, {'prompt': [U('นับ')], 'completion': [A('หนึ่ง')]}]),
    'prompt_completion': ([{'prompt': 'q', 'completion': 'a'}], [{'prompt': [U('q')], 'completion': [A('a')]}]),
}
DPO_IN = {
    'preference': ([{'prompt': 'q', 'chosen': 'a ครับ', 'rejected': 'a'}], [{'prompt': [U('q')], 'chosen': [A('a ครับ')], 'rejected': [A('a')]}]),
    'preference_messages': ([{'prompt': [S('s'), U('q')], 'chosen': [A('a ครับ')], 'rejected': [A('b')]}],
                            [{'prompt': [S('s'), U('q')], 'chosen': [A('a ครับ')], 'rejected': [A('b')]}]),
    'implicit_prompt': ([{'chosen': [U('q'), A('a ครับ')], 'rejected': [U('q'), A('a')]}], [{'prompt': [U('q')], 'chosen': [A('a ครับ')], 'rejected': [A('a')]}]),
}

@pytest.mark.parametrize('ext', ['jsonl', 'json', 'csv', 'parquet'])
@pytest.mark.parametrize('kind,schema', [('sft', s) for s in SFT_IN] + [('dpo', s) for s in DPO_IN])
def test_round_trip(tmp_path, ext, kind, schema):
    rows, want = (SFT_IN if kind == 'sft' else DPO_IN)[schema]
    ds, rep = load_records(_write(tmp_path/f'd.{ext}', rows), kind)
    assert ds.to_list() == want
    assert (rep.read, rep.kept, rep.n_rejected) == (len(rows), len(rows), 0)


@pytest.mark.parametrize('ext', ['jsonl', 'json', 'csv', 'parquet', 'txt'])
def test_round_trip_pretrain(tmp_path, ext):
    texts = ['ราคา 345 บาท อ่านว่า สามร้อยสี่สิบห้าบาท', 'เลข 7 เขียนเป็นเลขไทยว่า ๗']
    p = tmp_path/f'd.{ext}'
    if ext == 'txt': p.write_text('\n'.join(texts) + '\n', encoding='utf-8')
    else: _write(p, [{'text': t, 'source': 'web'} for t in texts])
    ds, rep = load_records(p, 'pretrain')
    assert ds['text'] == texts and ds.column_names == ['text']
    if ext != 'txt': assert rep.ignored_columns == ['source']


def test_in_memory_and_trl_forms():
    from trl.data_utils import is_conversational
    ds, _ = load_records(datasets.Dataset.from_list(SFT_IN['alpaca'][0]), 'sft')
    assert all(is_conversational(r) for r in ds)
    dd, _ = load_records(DPO_IN['preference'][0], 'dpo')
    assert is_conversational(dd[0]) and dd.column_names == ['prompt', 'chosen', 'rejected']


def test_normalisation_counted(tmp_path):
    rows = [{'text': 'สวัสดี\u200bครับ'}, {'text': 'เเปลก'}, {'text': 'ปกติ'}]
    ds, rep = load_records(rows, 'pretrain')
    assert ds['text'] == ['สวัสดีครับ', 'แปลก', 'ปกติ'] and rep.normalized == 2
    ds, rep = load_records(rows, 'pretrain', normalize=False)
    assert ds['text'][0] == 'สวัสดี\u200bครับ' and rep.normalized == 0
    assert normalize_thai('ก้้า') == 'ก้า'


def test_pretrain_over_length_counted_not_dropped(tok):
    rows = [{'text': 'ราคา 345 บาท อ่านว่า สามร้อยสี่สิบห้าบาท ' * 5}, {'text': 'ห้า'}]
    ds, rep = load_records(rows, 'pretrain', tokenizer=tok, max_length=16)
    assert (rep.kept, rep.truncated) == (2, 1)


# ---------------------------------------------------------------------------------------------------------------
# the demo curriculum

SMALL = dict(n_pretrain=400, n_sft=300, n_dpo=200, n_eval=60)

def _hash(c): return hashlib.sha256(json.dumps(c, ensure_ascii=False).encode()).hexdigest()

def test_curriculum_deterministic():
    a, b = demo_curriculum(seed=3, **SMALL), demo_curriculum(seed=3, **SMALL)
    assert _hash(a) == _hash(b)
    assert _hash(demo_curriculum(seed=4, **SMALL)) != _hash(a)
    assert list(a) == ['pretrain_train', 'pretrain_eval', 'sft_train', 'sft_eval', 'dpo_train', 'dpo_eval']
    assert {k: len(v) for k, v in a.items()} == {'pretrain_train': 400, 'pretrain_eval': 60, 'sft_train': 300, 'sft_eval': 60, 'dpo_train': 200, 'dpo_eval': 60}


def _all_text(r): return ' '.join([r['text']] if 'text' in r else [m['content'] for k in ('prompt', 'completion', 'chosen', 'rejected') for m in r.get(k, [])])

@pytest.mark.parametrize('seed', [0, 7])
def test_curriculum_no_overlap(seed):
    c, held = demo_curriculum(seed=seed), heldout_numbers(seed)
    train_nums = {n for k in ('pretrain_train', 'sft_train', 'dpo_train') for r in c[k] for n in numbers_in(_all_text(r))}
    assert not train_nums & held  # no held-out number anywhere in training
    for kind in ('sft', 'dpo'):
        eval_prompt_nums = {n for r in c[f'{kind}_eval'] for n in numbers_in(r['prompt'][-1]['content'])}
        assert eval_prompt_nums <= held and not eval_prompt_nums & train_nums
        train_prompts = {r['prompt'][-1]['content'] for r in c[f'{kind}_train']}
        assert not {r['prompt'][-1]['content'] for r in c[f'{kind}_eval']} & train_prompts
    assert all(set(numbers_in(r['text'])) & held for r in c['pretrain_eval'])
    assert not {r['text'] for r in c['pretrain_eval']} & {r['text'] for r in c['pretrain_train']}


def test_curriculum_styles_and_tasks():
    c = demo_curriculum(seed=0)
    assert all(not is_polite(r['completion'][0]['content']) for r in c['sft_train'] + c['sft_eval'])
    assert all(r['chosen'][0]['content'].endswith(' ครับ') for r in c['dpo_train'])
    bare = sum(strip_polite(r['chosen'][0]['content']) == r['rejected'][0]['content'] for r in c['dpo_train']) / len(c['dpo_train'])
    assert 0.6 < bare < 0.8  # mostly impolite-but-correct rejections, the rest wrong answers
    assert all(r['chosen'] != r['rejected'] for r in c['dpo_train'] + c['dpo_eval'])
    assert {demo_task(r) for r in c['sft_eval']} == {'to_words', 'to_thai_digits', 'to_arabic', 'add'}
    assert POLITE_PARTICLES == ('ครับ', 'ค่ะ')
    # the records are already in the normalised schemas: loading changes nothing
    ds, rep = load_records(c['dpo_eval'], 'dpo')
    assert ds.to_list() == c['dpo_eval'] and rep.normalized == 0


@pytest.mark.parametrize('kind', ['pretrain', 'sft', 'dpo'])
def test_stage_demo_data(kind, tok):
    sd = load_stage_data(StageConfig(kind=kind, data=f'demo:{kind}', max_length=128), seed=0, tokenizer=tok, **SMALL)
    n = {'pretrain': 400, 'sft': 300, 'dpo': 200}[kind]
    assert (len(sd.train), len(sd.eval), sd.report.n_rejected) == (n, 60, 0)
    assert sd.train.column_names == {'pretrain': ['text'], 'sft': ['prompt', 'completion'], 'dpo': ['prompt', 'chosen', 'rejected']}[kind]


def test_stage_eval_data_file(tmp_path):
    p = _write(tmp_path/'ev.jsonl', SFT_IN['alpaca'][0])
    sd = load_stage_data(StageConfig(kind='sft', data='demo:sft', eval_data=str(p)), **SMALL)
    assert sd.eval.to_list() == SFT_IN['alpaca'][1] and sd.eval_report.source.endswith('ev.jsonl')


# ---------------------------------------------------------------------------------------------------------------
# packing, padding, tokenizer statistics

def test_pack_and_padding(tok):
    c = demo_curriculum(seed=0, **SMALL)
    ds, _ = load_records(c['pretrain_train'], 'pretrain')
    packed, rep = pack_dataset(ds, tok, 64)
    n_tok = sum(len(tok(t, add_special_tokens=False)['input_ids']) + 1 for t in ds['text'])
    assert rep.tokens == n_tok and rep.blocks == n_tok // 64 and rep.dropped_tokens == n_tok % 64
    assert packed.column_names == ['input_ids'] and all(len(b) == 64 for b in packed['input_ids'])
    flat = [t for x in ds['text'] for t in tok(x, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]]
    assert [t for b in packed['input_ids'] for t in b] == flat[:rep.blocks * 64]  # texts in order, each ended by EOS
    sft, _ = load_records(c['sft_train'], 'sft')
    pr = padding_report(tok, sft, 64, batch_size=16)
    assert pr.samples == 300 and 0 <= pr.packed_waste < pr.padded_waste < 1
    st = tokenizer_stats(tok, ds['text'][:50])
    assert st['chars_per_token'] == pytest.approx(st['chars'] / st['tokens']) and st['chars_per_token'] > 1.5
