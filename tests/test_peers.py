"""The peers' arms (PEFT LoRA and SHiRA) inside `tune()`'s loop: what they train, the adapter PEFT saves, the merged
concept, and SHiRA given ppt's mask against ppt's own optimizer on the same entries."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

peft = pytest.importorskip("peft")

from ppt_fast.audio import synth_reference, write_wav  # noqa: E402
from ppt_fast.eval import arms, peers  # noqa: E402
from ppt_fast.models import load_host  # noqa: E402
from ppt_fast.scope import ScopeEntry  # noqa: E402
from ppt_fast.tuning import Strategy, tune_model  # noqa: E402

FAST = dict(steps=4, sensitivity_batches=2, batch_size=2, segment_seconds=1.0, verbose=False, use_cache=False)
HOSTS = ["tiny-random", pytest.param("hf-tiny-random", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("transformers") is None, reason="transformers not installed"))]  # fmt: skip


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    write_wav(str(path), synth_reference(6.0, 16000, seed=3, timbre="pluck"), 16000)
    return str(path)


def _codes(host, frames: int = 30, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lm = host.lm
    card, n_q = ((lm.card, lm.num_codebooks) if host.library == "audiocraft" else
                 (lm.config.decoder.vocab_size, lm.decoder.num_codebooks))  # fmt: skip
    return torch.randint(0, card, (2, n_q, frames), generator=g)


def test_registry_is_one_table_for_the_protocol_and_the_benchmarks():
    from ppt_fast.eval.protocol import METHODS

    assert set(arms.PEERS) == {"lora", "lora-matched", "shira"} <= set(METHODS)
    assert "dense-masked" in arms.ARMS and "dense-masked" not in METHODS  # a benchmark arm: ppt-1%'s numbers
    lora = arms.get("lora")
    assert (lora.rank, lora.alpha, lora.dropout, lora.lr) == (16, 16.0, 0.05, 2e-4)  # musicgen-dreamboothing
    assert all(a.tuned for a in arms.ARMS.values() if a.name != "base") and not arms.get("base").tuned
    with pytest.raises(ValueError, match="not one of"):
        arms.get("qlora")


@pytest.mark.parametrize("model", HOSTS)
def test_lora_targets_follow_the_recipe(model):
    host = load_host(model, seed=0)
    targets = peers.lora_targets(host, arms.get("lora"))
    names = [t.name for t in targets]
    if host.library == "audiocraft":  # packed Q/K/V as target parameters; out_proj and the feed-forward as modules
        per_layer = ["self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight",
                     "cross_attention.in_proj_weight", "cross_attention.out_proj.weight"]  # fmt: skip
        assert {t.name for t in targets if not t.linear} == {n for n in names if n.endswith("in_proj_weight")}
    else:
        per_layer = [f"{a}.{p}_proj.weight" for a in ("self_attn", "encoder_attn") for p in "qkvo"[:3]] + [
            "self_attn.out_proj.weight", "encoder_attn.out_proj.weight", "fc1.weight", "fc2.weight"]  # fmt: skip
        assert all(t.linear for t in targets)
    layers = {n.split(".layers.")[1].split(".")[0] for n in names}
    assert len(names) == len(per_layer) * len(layers)
    for suffix in per_layer:
        assert sum(n.endswith(suffix) for n in names) == len(layers), suffix
    matched = peers.lora_targets(host, arms.get("lora-matched"))
    assert {t.name for t in matched} == {e.name for e in host.scope("ppt").resolve(host.lm)}


@pytest.mark.parametrize("model", HOSTS)
def test_lora_matched_rank_is_nearest_ppt_count(model):
    host = load_host(model, seed=0)
    targets = peers.lora_targets(host, arms.get("lora-matched"))
    cost = peers.rank_cost(host.lm, targets)
    for count in (1, cost // 3, cost, 5 * cost + cost // 3, 7 * cost + 2 * cost // 3):
        r = peers.matched_rank(host, targets, count)
        assert r >= 1
        assert abs(r * cost - count) <= cost / 2 or (r == 1 and count < cost)


@pytest.mark.parametrize("model", HOSTS)
def test_lora_arm_trains_in_the_loop_and_its_adapter_equals_the_merged_concept(model, ref_wav, tmp_path):
    """The adapter PEFT saved, loaded onto a fresh base model with the run's tokens, gives the loss of the concept
    (the merged weights) applied to another fresh base model; nothing outside the targets moved."""
    arm = arms.get("lora")
    run = peers.tune_peer(ref_wav, arm, model=model, seed=0, adapter_dir=str(tmp_path / "adapter"), **FAST)
    host = load_host(model, seed=0)
    targets = peers.lora_targets(host, arm)
    assert run.rank == 16 and run.trainable == 16 * peers.rank_cost(host.lm, targets)
    assert run.optimizer_state_bytes == 2 * 4 * run.trainable  # AdamW: exp_avg + exp_avg_sq, fp32
    assert 4 * run.trainable <= run.adapter_bytes <= 4 * run.trainable + 64 * 1024
    assert run.result.settings["preset"] == "lora" and run.result.settings["strategy"] == "lora"
    c = run.concept
    assert c.pivots.count == 0 and set(c.dense) == {t.name for t in targets}
    base = {n: p.detach().clone() for n, p in host.lm.named_parameters()}
    moved = {n for n, t in c.dense.items() if not torch.equal(t, base[n].reshape(t.shape))}
    assert moved == set(c.dense)  # every adapted tensor changed (B left zero would change none)
    c.apply(host.model)
    fresh = load_host(model, seed=0)
    peft.PeftModel.from_pretrained(fresh.lm, str(tmp_path / "adapter"))
    fresh.identifier_bank().add("<v1>", c.tokens["<v1>"])
    codes, prompts = _codes(host), ["a piece of music, <v1>"] * 2
    with torch.no_grad():
        merged, adapted = float(host.loss(codes, prompts)), float(fresh.loss(codes, prompts))
    assert abs(merged - adapted) < 1e-4 * max(1.0, abs(merged)), (merged, adapted)
    c.remove(host.model)
    for n, p in host.lm.named_parameters():
        assert torch.equal(p, base[n]), n


def _fake_acc(shapes: dict[str, tuple[tuple[int, ...], tuple[int, int]]], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    entries, scores = [], {}
    for name, (shape, rows) in shapes.items():
        p = torch.zeros(shape)
        entries.append(ScopeEntry(name, p, rows))
        scores[name] = torch.rand(rows[1] - rows[0], *shape[1:], generator=g)
    numel = sum(s.numel() for s in scores.values())
    return SimpleNamespace(entries=entries, scores=scores, names=list(shapes), numel=numel)


def test_per_layer_select_keeps_each_layers_top_entries():
    d = 8
    # audiocraft's layout: self-attn V rows [2d:3d] (one layer), cross-attn K/V rows [d:3d] (two layers)
    acc = _fake_acc({"self.in_proj_weight": ((3 * d, d), (2 * d, 3 * d)),
                     "cross.in_proj_weight": ((3 * d, d), (d, 3 * d))})  # fmt: skip
    run = SimpleNamespace(cfg=SimpleNamespace(count=None, ratio=0.25))
    sel = peers.per_layer_select()(run, acc)
    per = round(0.25 * acc.numel / 3)
    assert sel.count == 3 * per
    for e in acc.entries:
        idx = sel.indices_of(e.name).long()
        rows = idx // d
        assert bool(((rows >= e.rows[0]) & (rows < e.rows[1])).all())
        for j in range((e.rows[1] - e.rows[0]) // d):  # each d x d layer: exactly its own top `per`
            lo = (e.rows[0] + j * d) * d
            mine = idx[(idx >= lo) & (idx < lo + d * d)] - lo
            block = acc.scores[e.name].reshape(-1)[j * d * d : (j + 1) * d * d]
            assert mine.numel() == per
            assert set(mine.tolist()) == set(torch.topk(block, per).indices.tolist())
    assert peers.per_layer_select(5)(run, acc).count == 15


@pytest.mark.skipif(__import__("importlib").util.find_spec("transformers") is None, reason="needs transformers")
def test_shira_through_peft_is_sparse_adamw_on_the_same_entries(ref_wav):
    """SHiRA given ppt's mask (PEFT's ShiraConfig, mask_fn) and ppt's own SparseAdamW over the same entries, from
    the same base, tokens and batches: the same weights, up to float rounding. So the quality of `shira` is that of
    its mask; what differs is the cost (the benchmarks)."""
    model = "hf-tiny-random"
    run = peers.tune_peer(ref_wav, arms.get("shira"), model=model, seed=0, **FAST)
    assert run.impl.startswith("peft ShiraConfig") and run.adapter_bytes
    host = load_host(model, seed=0)
    r, per_block = peers.shira_rank(host, round(arms.MATCH * peers.scope_entries(host)))
    assert run.rank == r and run.trainable == run.concept.pivots.count == per_block * 3 * 2  # 3 layers x 2 blocks
    ours = tune_model(ref_wav, model=model, preset="ppt", ratio=arms.MATCH, seed=0,
                      strategy=Strategy("ours", select=peers.per_layer_select(per_block)), **FAST)  # fmt: skip
    from ppt_fast.concept import Concept

    c_ours = Concept.capture(ours, "<v1>")
    c_peft = run.concept
    assert torch.equal(c_ours.pivots.indices, c_peft.pivots.indices)
    base = host.lm.state_dict()
    moved = torch.cat([(c_peft.values - torch.cat([base[n].reshape(-1)[i.long()] for n, i in c_peft.pivots]))])
    assert moved.abs().max() > 1e-5  # the runs trained something
    assert torch.allclose(c_ours.values, c_peft.values, rtol=1e-5, atol=1e-6), (
        (c_ours.values - c_peft.values).abs().max()
    )
    assert torch.allclose(c_ours.tokens["<v1>"], c_peft.tokens["<v1>"], rtol=1e-5, atol=1e-6)


def test_shira_on_packed_projections_runs_sparse_adamw_with_ppts_count(ref_wav):
    run = peers.tune_peer(ref_wav, arms.get("shira"), model="tiny-random", seed=0, **FAST)
    host = load_host("tiny-random", seed=0)
    count = round(arms.MATCH * peers.scope_entries(host))
    assert "through SparseAdamW" in run.impl and run.adapter_bytes is None
    blocks = 3 * len({e.name.split(".layers.")[1].split(".")[0] for e in host.scope("ppt").resolve(host.lm)})
    assert run.concept.pivots.count == round(count / blocks) * blocks
