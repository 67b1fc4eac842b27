"""Fuzzing the concept-file reader: seeded mutants of real concept files either load as a valid Concept or raise
ConceptError; never another exception, never a hang, never an allocation past a small multiple of the file's size.

Mutants come in two kinds. Raw ones change the file's bytes (bits flipped, bytes changed, inserted or cut, the
8-byte safetensors header length, the safetensors JSON header); most fail the checksum, which is what it is for.
Crafted ones change what the file says (our JSON header, the metadata fields, the varint index stream, the tensors'
values, dtypes, shapes and names) and then recompute the checksum, as anyone can (it is an unkeyed sha256): they
reach the decoder, whose own checks must hold on their own.

The default run fuzzes for 15 s (~2500 mutants); `-m slow` runs the same loop for 5 minutes.
"""

from __future__ import annotations

import copy
import json
import random
import re
import resource
import signal
import time
import tracemalloc

import pytest
import torch
from _concept_cases import TinyBank, _one_thread  # noqa: F401  (_one_thread: an autouse fixture)
from torch.profiler import ProfilerActivity, profile

from ppt_fast import PivotSet
from ppt_fast import concept as C
from ppt_fast.concept import Concept, ConceptError, snapshot_base
from ppt_fast.concept import format as F

# A loaded mutant's decoder may allocate this many bytes per byte of the file in one torch op (int64 copies of the
# index stream are 8x) plus this much regardless of size (allocator granularity, small per-tensor tables).
ALLOC_PER_BYTE = 16
ALLOC_SLACK = 64 * 1024
# Python-side (tracemalloc) peak: JSON objects of a header cost ~20-40x its text; the file itself is read once.
PY_PER_BYTE = 96
PY_SLACK = 256 * 1024
LOAD_SECONDS = 5.0  # one load of a ~2-6 kB file takes ~1 ms; 5 s only on a hang
SAFETY_NET = "malformed concept header ("  # load_concepts' catch-all: a mutant that reaches it escaped every check



class Net(torch.nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.in_proj_weight = torch.nn.Parameter(torch.randn(3 * d, d))
        self.in_proj_bias = torch.nn.Parameter(torch.randn(3 * d))
        self.head = torch.nn.Linear(3 * d, 3)


def _model() -> torch.nn.Module:
    m = Net()
    object.__setattr__(m, C.BANK_ATTR, TinyBank(5))
    return m


def _tuned(base: torch.nn.Module, ident: str, g: torch.Generator, *, dense=None, storage=torch.float32, fp=True):
    """A concept captured from a copy of `base` after a fake training step, and that copy's bank-free base."""
    m = copy.deepcopy(base)
    masks = {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in m.named_parameters()}
    piv = PivotSet.from_masks(masks)
    snap = snapshot_base(m, piv, dense)
    with torch.no_grad():
        for n, p in m.named_parameters():
            mk = masks[n].clone()
            if dense and n in dense:
                mk[dense[n] if dense[n] is not None else slice(None)] = True
            p[mk] += torch.randn(p.shape, generator=g)[mk]
    tokens = {ident: torch.randn(3, 5, generator=g)}
    meta = {"lr": 0.01, "preset": "ppt"}
    return Concept.capture(m, piv, identifiers=[ident], tokens=tokens, dense=dense, base=snap if fp else None,
                           storage_dtype=storage, meta=meta)  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real concept files (fp32 with dense rows, an fp16 bundle with a whole dense tensor, tokens only, one without a
    fingerprint) and the base model each applies to."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(7)
    base = _model()
    out = tmp_path_factory.mktemp("fuzz_corpus")
    files = []
    a = _tuned(base, "<a>", g, dense={"in_proj_weight": slice(4, 8)})
    b = _tuned(base, "<b>", g, dense={"in_proj_bias": None}, storage=torch.float16)
    c = _tuned(base, "<c>", g, storage=torch.bfloat16)
    names = [n for n, _ in base.named_parameters()]
    tok = Concept(["<t>"], {"<t>": torch.randn(2, 5, generator=g)}, PivotSet.empty(names, [p.shape for p in
                  base.parameters()]), torch.empty(0))  # fmt: skip
    nofp = _tuned(base, "<u>", g, fp=False)
    for name, cs in (("a", [a]), ("bundle", [b, c]), ("tokens", [tok]), ("nofp", [nofp])):
        path = out / f"{name}.ppt"
        C.save_concepts(cs, path)
        files.append((name, path.read_bytes()))
    return base, files


# ---------------------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------------------
NASTY = [-1, 0, 1, 2, 7, 2**20, 2**30, 2**31 - 1, 2**31, 2**40, 2**63, -(2**63), 10**30, 1.5, -0.0, 1e308,
         float("nan"), float("inf"), True, False, None, "", "x", "varint-gap", "float32", "sha256", [], {}, [0],
         [2**40], [[2**40]], [-1, 5], [0, 2**40], [1, 0], {"a": 1}, "\u0000", "<a>", "a b", "a" * 3000,
         [[[[[]]]]]]  # fmt: skip


def _split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors, meta = F._read_safetensors(data, "corpus")
    return dict(meta), dict(tensors)


def _sign(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """What a forger does: recompute the unkeyed checksum, write a well-formed safetensors file."""
    meta = dict(meta)
    meta["checksum"] = F._checksum(meta.get("header", ""), tensors)
    return F._serialize(tensors, meta)


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON object."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate_json(obj, rng: random.Random):
    """A copy of `obj` with one random node replaced, deleted, duplicated or given an extra key."""
    obj = copy.deepcopy(obj)
    paths = [p for p, _ in _paths(obj) if p]
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    op = rng.random()
    if op < 0.6:
        parent[key] = rng.choice(NASTY)
    elif op < 0.75:
        del parent[key]
    elif op < 0.85 and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif op < 0.9 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += rng.choice([-1, 1, 2**20, 2**30, 2**31, 2**40])
    else:
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[rng.choice(["extra", "counts", "rows", "sha256", "tensors"])] = rng.choice(NASTY)
        else:
            target.append(rng.choice(NASTY))
    return obj


def _raw(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return "bits flipped", bytes(b)
    if op == 1:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return "bytes changed", bytes(b)
    if op == 2:
        return "truncated", bytes(b[: rng.randrange(len(b))])
    if op == 3:
        at = rng.randrange(len(b) + 1)
        return "bytes inserted", bytes(b[:at] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 9))) + b[at:])
    if op == 4:
        at = rng.randrange(len(b))
        return "bytes deleted", bytes(b[:at] + b[at + rng.randint(1, 9) :])
    if op == 5:
        n = int.from_bytes(b[:8], "little")
        new = rng.choice([0, 1, n - 1, n + 1, n + 8, n - 8, len(b), 2**40, 2**63, 2**64 - 1, rng.randrange(2**64)])
        return "header length changed", (new % 2**64).to_bytes(8, "little") + bytes(b[8:])
    # The safetensors JSON header: a field changed, the length fixed up (or not), the payload kept.
    n = int.from_bytes(b[:8], "little")
    head = json.loads(b[8 : 8 + n])
    head = _mutate_json(head, rng)
    js = json.dumps(head).encode()
    js += b" " * (-len(js) % 8)
    length = len(js) if rng.random() < 0.8 else n
    return "safetensors header changed", length.to_bytes(8, "little") + js + bytes(b[8 + n :])


def _crafted(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    meta, tensors = _split(data)
    op = rng.randrange(7)
    if op == 0:
        header = _mutate_json(json.loads(meta["header"]), rng)
        meta["header"] = json.dumps(header)  # allow_nan: a forger may write NaN / Infinity
        return "header field changed", _sign(meta, tensors)
    if op == 6:  # a consistent lie about sizes: a huge tensor with a huge pivot count, no fingerprint to contradict
        header = json.loads(meta["header"])
        e = rng.choice(header["concepts"])
        if e["pivots"]["names"]:
            i = rng.randrange(len(e["pivots"]["names"]))
            n = rng.choice([2**20, 2**30, 2**31 - 1, 2**31, 2**40])
            e["pivots"]["shapes"][i] = rng.choice([[n], [n, 1], [1, n]])
            e["pivots"]["counts"][i] = rng.choice([n, n // 2, e["pivots"]["counts"][i] + 1])
            e["fingerprint"] = {}
        meta["header"] = json.dumps(header)
        return "pivot count and shape enlarged", _sign(meta, tensors)
    if op == 1:
        key = rng.choice(["format", "format_version", "header", "ppt_fast_version", "checksum", "extra"])
        value = rng.choice(["", "0", "-1", "2", "1e9", "9" * 40, "\u0661", "null", "[]", "{}", '{"concepts": []}',
                            '{"concepts": [null]}', "[" * 50000 + "]" * 50000, '{"concepts": NaN}',
                            '{"concepts": [1e999]}', "ppt_fast.Concept", "x" * 5000])  # fmt: skip
        if rng.random() < 0.2:
            meta.pop(key, None)
        else:
            meta[key] = value
        signed = _sign(meta, tensors)
        return f"metadata {key} changed", signed if key != "checksum" else F._serialize(tensors, meta)
    names = sorted(tensors)
    if op == 2:  # the varint index stream
        gname = rng.choice([n for n in names if n.endswith("pivots.gaps")])
        g = bytearray(tensors[gname].numpy().tobytes())
        how = rng.randrange(5)
        if how == 0 and g:
            g[rng.randrange(len(g))] = rng.randrange(256)
        elif how == 1 and g:
            g[rng.randrange(len(g))] ^= 0x80
        elif how == 2:
            g.insert(rng.randrange(len(g) + 1), rng.randrange(256))
        elif how == 3 and g:
            del g[rng.randrange(len(g))]
        else:
            g += bytes([0xFF] * rng.randint(1, 9) + [0x7F])
        tensors[gname] = torch.frombuffer(bytearray(g), dtype=torch.uint8) if g else torch.empty(0, dtype=torch.uint8)
        return "varint bytes changed", _sign(meta, tensors)
    name = rng.choice(names)
    t = tensors[name]
    if op == 3 and t.is_floating_point() and t.numel():  # values: non-finite or extreme
        t = t.clone()
        t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), -float("inf"), 1e38, -0.0])
        tensors[name] = t
        return f"value of {name} changed", _sign(meta, tensors)
    if op == 4:  # dtype or shape
        if rng.random() < 0.5:
            dt = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int32, torch.int64])
            tensors[name] = t.to(dt)
            return f"dtype of {name} changed", _sign(meta, tensors)
        k = t.numel()
        new = rng.choice([(k,), (1, k), (k, 1), (0,), (k + 1,), (max(k - 1, 0),), (k, 0, 3)])
        need = torch.Size(new).numel()
        flat = t.reshape(-1)
        tensors[name] = flat[:need].reshape(new) if flat.numel() >= need else torch.zeros(new, dtype=t.dtype)
        return f"shape of {name} changed", _sign(meta, tensors)
    how = rng.randrange(3)
    if how == 0:
        del tensors[name]
    elif how == 1:
        tensors[rng.choice(["c0.extra", "c9.pivots.values", "c0.tokens.7", "c0.dense.3"])] = torch.zeros(3)
    else:
        tensors[rng.choice(["c0.pivots.values", "c1.pivots.gaps", "c0.tokens.0", "c0.dense.0"])] = tensors.pop(name)
    return "tensor set changed", _sign(meta, tensors)


def mutant(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    return _raw(data, rng) if rng.random() < 0.4 else _crafted(data, rng)


# ---------------------------------------------------------------------------------------------------------------------
# What a loaded mutant must be
# ---------------------------------------------------------------------------------------------------------------------
def assert_really_valid(c: Concept, base: torch.nn.Module) -> None:
    """Finite values, pivots inside their tensors and strictly increasing (checked here, not by the library), and
    applying it to its base model either refuses (ConceptError) or leaves finite parameters that remove restores."""
    assert isinstance(c, Concept)
    for t in (c.values, *c.dense.values(), *c.tokens.values()):
        assert bool(torch.isfinite(t.float()).all())
    o = c.pivots.offsets.tolist()
    assert o[0] == 0 and o[-1] == c.pivots.indices.numel() == c.values.numel()
    for i, s in enumerate(c.pivots.shapes):
        idx = c.pivots.indices[o[i] : o[i + 1]].long()
        assert o[i] <= o[i + 1]
        assert bool((idx >= 0).all()) and bool((idx < s.numel()).all())
        assert bool((idx[1:] > idx[:-1]).all())
    for ident, t in c.tokens.items():
        assert ident in c.identifiers and t.dim() == 2 and t.shape[0] >= 1
    m = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    try:
        c.apply(m, force=True, allow_unverified=True)
    except ConceptError:
        return
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    c.remove(m)
    assert all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())


def max_torch_alloc(path, data: bytes):
    """(the largest single CPU allocation any torch op makes while loading `data`, what the load returned)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = _try_load(path, data)
    return max((e.cpu_memory_usage for e in prof.events()), default=0), result


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


class _AddressSpaceGuard:
    """Caps this process's address space a few GiB above what it uses now, so a decoder that tries a huge
    allocation fails the test instead of exhausting the (shared) machine; restored afterwards."""

    def __enter__(self):
        self.old = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        cap = vm + 4 * 2**30
        if self.old[1] == resource.RLIM_INFINITY or cap < self.old[1]:
            resource.setrlimit(resource.RLIMIT_AS, (cap, self.old[1]))
        return self

    def __exit__(self, *exc):
        resource.setrlimit(resource.RLIMIT_AS, self.old)


def _load(path, data: bytes):
    path.write_bytes(data)
    return C.load_concepts(path)


def fuzz(corpus, tmp_path, seconds: float, seed: int) -> dict[str, int]:
    base, files = corpus
    path = tmp_path / "m.ppt"
    stats = {"mutants": 0, "loaded": 0, "refused": 0, "profiled": 0}
    failures = []
    old = signal.signal(signal.SIGALRM, _alarm)
    t_end = time.perf_counter() + seconds
    try:
        with _AddressSpaceGuard():
            while time.perf_counter() < t_end and len(failures) < 5:
                i = stats["mutants"]
                rng = random.Random(f"{seed}:{i}")  # mutant i of a seed is reproducible on its own
                name, data = rng.choice(files)
                how, m = mutant(data, rng)
                what = f"mutant {i} of seed {seed} ({how} of {name})"
                stats["mutants"] += 1
                sample = i % 8
                signal.setitimer(signal.ITIMER_REAL, LOAD_SECONDS)
                try:
                    t0 = time.perf_counter()
                    if sample == 0:  # the largest torch allocation, against the file's size
                        alloc, result = max_torch_alloc(path, m)
                        stats["profiled"] += 1
                        if alloc > ALLOC_PER_BYTE * len(m) + ALLOC_SLACK:
                            failures.append(f"{what}: a torch op allocated {alloc} B for a {len(m)}-B file")
                    elif sample == 4:  # Python-side peak
                        tracemalloc.start()
                        result = _try_load(path, m)
                        peak = tracemalloc.get_traced_memory()[1]
                        tracemalloc.stop()
                        if peak > PY_PER_BYTE * len(m) + PY_SLACK:
                            failures.append(f"{what}: Python allocations peaked at {peak} B for a {len(m)}-B file")
                    else:
                        result = _try_load(path, m)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    if isinstance(result, BaseException):
                        raise result
                    stats["loaded"] += 1
                    for c in result:
                        assert_really_valid(c, base)
                except ConceptError as e:
                    stats["refused"] += 1
                    if SAFETY_NET in str(e):
                        failures.append(f"{what}: only the catch-all refused it: {e}")
                except _Hang:
                    failures.append(f"{what}: load took over {LOAD_SECONDS} s")
                except Exception as e:  # noqa: BLE001 - any other exception is the failure this test looks for
                    failures.append(f"{what}: {type(e).__name__}: {e}")
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    if tracemalloc.is_tracing():
                        tracemalloc.stop()
                if time.perf_counter() - t0 > LOAD_SECONDS:
                    failures.append(f"{what}: took {time.perf_counter() - t0:.1f} s")
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not failures, "\n".join(failures)
    return stats


def _try_load(path, data):
    """load_concepts, with the exception returned rather than raised (so the profiler's context exits cleanly)."""
    try:
        return _load(path, data)
    except Exception as e:  # noqa: BLE001
        return e


def test_fuzz_concept_files(corpus, tmp_path):
    stats = fuzz(corpus, tmp_path, seconds=15.0, seed=0)
    # The mutants reach every outcome: some load (harmless changes), most are refused, the profiler ran.
    assert stats["mutants"] > 500 and stats["loaded"] > 10 and stats["refused"] > 100 and stats["profiled"] > 50, stats


@pytest.mark.slow
def test_fuzz_concept_files_long(corpus, tmp_path):
    seed = int(time.time())  # a new seed each run, named in any failure (with the mutant's number)
    fuzz(corpus, tmp_path, seconds=300.0, seed=seed)


# ---------------------------------------------------------------------------------------------------------------------
# Declared sizes are checked against the file before anything is allocated
# ---------------------------------------------------------------------------------------------------------------------
def _entry_mutant(data: bytes, change) -> bytes:
    meta, tensors = _split(data)
    header = json.loads(meta["header"])
    change(header["concepts"][0], tensors)
    meta["header"] = json.dumps(header)
    return _sign(meta, tensors)


def _set_first_pivot_tensor(shape, count):
    def change(e, tensors):
        e["fingerprint"] = {}
        e["pivots"]["shapes"][0] = shape
        e["pivots"]["counts"][0] = count

    return change


def _wide_first_gap(e, tensors):
    """The first index's varint is 7 bytes long (a gap of ~2**42), the right number of varints in all."""
    k = sum(e["pivots"]["counts"])
    tensors["c0.pivots.gaps"] = torch.tensor([0xFF] * 6 + [1] + [0] * (k - 1), dtype=torch.uint8)


HUGE = [
    ("2**30 pivots claimed", _set_first_pivot_tensor([2**30], 2**30), "index stream holds"),
    ("2**40 pivots claimed", _set_first_pivot_tensor([2**40], 2**40), "integers in \\[0, 2147483647\\]"),
    ("a shape of 2**60 entries", _set_first_pivot_tensor([2**30, 2**30], 1), "< 2\\*\\*31 entries"),
    ("dense rows of 2**40", lambda e, t: e["dense"][0].update(rows=[0, 2**40]), "integers in"),
    ("a dense shape of 2**30", lambda e, t: e["dense"][0].update(shape=[2**15, 2**15], rows=None), "has shape"),
    ("a gap wider than 2**35", _wide_first_gap, "gap wider than 2\\*\\*35"),
]


@pytest.mark.parametrize("label, change, match", HUGE, ids=[h[0] for h in HUGE])
def test_huge_declared_sizes_refused_before_allocating(corpus, tmp_path, label, change, match):
    _, files = corpus
    data = _entry_mutant(dict(files)["a"], change)
    path = tmp_path / "h.ppt"
    with _AddressSpaceGuard():
        alloc, result = max_torch_alloc(path, data)
    assert isinstance(result, ConceptError), result
    assert re.search(match, str(result)), str(result)
    assert alloc <= ALLOC_PER_BYTE * len(data) + ALLOC_SLACK, alloc


@pytest.mark.parametrize("length", [2**40, 2**64 - 1, 0])
def test_huge_safetensors_header_length_refused(corpus, tmp_path, length):
    _, files = corpus
    data = dict(files)["a"]
    path = tmp_path / "l.ppt"
    with pytest.raises(ConceptError, match="not a readable concept file"):
        _load(path, length.to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize("header, match", [
    ('{"concepts": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
    ('{"concepts": [' + "9" * 5000 + "]}", "not JSON this reader takes"),
    ('{"concepts": [{"pivots": NaN}]}', "non-finite number NaN"),
    ('{"concepts": [{"pivots": -1e999}]}', "overflows a float"),
])  # fmt: skip
def test_hostile_header_json_refused(corpus, tmp_path, header, match):
    _, files = corpus
    meta, tensors = _split(dict(files)["a"])
    meta["header"] = header
    with pytest.raises(ConceptError, match=match) as e:
        _load(tmp_path / "n.ppt", _sign(meta, tensors))
    assert SAFETY_NET not in str(e.value)


def test_mutation_operators_reach_the_decoder(corpus):
    """Crafted mutants must pass the checksum (else the fuzz test would only test the checksum)."""
    _, files = corpus
    rng = random.Random(3)
    reached = 0
    for _ in range(200):
        name, data = rng.choice(files)
        how, m = _crafted(data, rng)
        try:
            tensors, meta = F._read_safetensors(m, "m")
        except ConceptError:
            continue
        reached += meta.get("checksum") == F._checksum(meta.get("header", ""), tensors)
    assert reached > 150
