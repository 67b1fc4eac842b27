"""The transformers host: a Hugging Face MusicgenForConditionalGeneration built in code (no downloads) through tune,
concept files and generate; the shared tests run on MusicgenMelodyForConditionalGeneration too (`hf-tiny-random-melody`:
no cross-attention, the condition is a prefix of the sequence, read through self-attention)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

import ppt_fast  # noqa: E402
from ppt_fast.audio import synth_reference, write_wav  # noqa: E402
from ppt_fast.concept import Concept  # noqa: E402
from ppt_fast.hosts.transformers import TransformersHost  # noqa: E402
from ppt_fast.hosts.transformers.build import build_tiny_random  # noqa: E402
from ppt_fast.hosts.transformers.host import delay_labels  # noqa: E402
from ppt_fast.models import load_host, model_kind  # noqa: E402
from ppt_fast.tuning import tune_model  # noqa: E402

FAST = dict(steps=12, sensitivity_batches=2, batch_size=2, segment_seconds=1.0, verbose=False, use_cache=False)


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    write_wav(str(path), synth_reference(6.0, 16000, seed=3, timbre="pluck"), 16000)
    return str(path)


NAMES = ["hf-tiny-random", "hf-tiny-random-melody"]


def _host(seed: int = 0, name: str = "hf-tiny-random") -> TransformersHost:
    return load_host(name, seed=seed)


def _base(name: str):
    return build_tiny_random(seed=0, melody=name.endswith("-melody"))


def test_resolution_and_kind(tmp_path):
    h = _host()
    assert isinstance(h, TransformersHost) and h.kind == "tiny-random" == model_kind("hf-tiny-random")
    assert (h.sample_rate, h.channels, h.frame_rate) == (16000, 1, 50.0)
    assert isinstance(load_host(h.model), TransformersHost)  # an object is used as it is
    h.model.save_pretrained(tmp_path / "saved")
    again = load_host(str(tmp_path / "saved"))
    assert isinstance(again, TransformersHost)
    for (n, a), (_, b) in zip(h.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        load_host("hf:nobody/no-such-musicgen")
    m = _host(name="hf-tiny-random-melody")
    assert type(m.model).__name__ == "MusicgenMelodyForConditionalGeneration" and m.melody and not h.melody
    assert m.kind == "tiny-random" == model_kind("hf-tiny-random-melody")
    assert not any("encoder_attn" in n for n, _ in m.model.named_parameters())
    m.model.save_pretrained(tmp_path / "melody")
    assert load_host(str(tmp_path / "melody")).melody


@pytest.mark.parametrize("name", NAMES)
def test_loss_is_the_delay_pattern_cross_entropy(name):
    """delay_labels + the model's own loss equal a hand-built teacher-forced cross-entropy: codebook k's code t is
    predicted at step t + k from the codes before it (pad / BOS where the pattern has none); on the melody model,
    over the audio steps after the condition prefix."""
    h = _host(name=name)
    m = h.model
    B, K, F = 2, 4, 9
    pad = m.config.decoder.pad_token_id
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (B, K, F), generator=g)
    labels = delay_labels(m, codes)
    assert labels.shape == (B, F + K - 1, K)
    for k in range(K):
        assert torch.equal(labels[:, k : k + F, k], codes[:, k])
        assert (labels[:, :k, k] == pad).all() and (labels[:, k + F :, k] == pad).all()
    prompts = ["a piece of music", "fast drums"]
    loss = h.loss(codes, prompts)
    # by hand: decoder inputs = labels shifted right by one step with the start token
    steps = F + K - 1
    dec_in = torch.full((B, K, steps), pad, dtype=torch.long)
    for k in range(K):
        dec_in[:, k, k + 1 : k + 1 + F] = codes[:, k, : min(F, steps - k - 1)]
    enc = h.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                decoder_input_ids=dec_in.reshape(B * K, steps))  # fmt: skip
    logits = out.logits.reshape(B, K, -1, out.logits.shape[-1])[:, :, -steps:]  # melody: the steps after the prefix
    ce = torch.nn.functional.cross_entropy
    want = sum(ce(logits[:, k, k : k + F].reshape(-1, logits.shape[-1]), codes[:, k].reshape(-1)) for k in range(K)) / K
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_identifier_anywhere_in_the_prompt_gives_the_same_logits(name):
    h = _host(name=name)
    bank = h.identifier_bank()
    bank.add("<v1>", torch.randn(3, h.model.config.decoder.hidden_size))
    codes = torch.randint(0, 64, (1, 4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = h.loss(codes, ["<v1>, a piece of music"])
        b = h.loss(codes, ["a piece of music, <v1>"])
        c = h.loss(codes, ["a piece <v1> of music"])
        base = h.loss(codes, ["a piece of music"])
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, base)  # the tokens reach cross-attention (melody: the prefix self-attention reads)
    bank.remove("<v1>")
    with torch.no_grad():
        assert torch.equal(h.loss(codes, ["a piece of music"]), base)


def test_guidance_gives_the_unconditional_half_no_identifier():
    """With classifier-free guidance the batch is doubled with a zero condition and a zero mask: the identifier
    embeddings are written into the conditional rows only."""
    h = _host()
    tokens = torch.randn(2, h.model.config.decoder.hidden_size)
    h.identifier_bank().add("<v1>", tokens)
    seen = []
    handle = h.model.enc_to_dec_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
    try:
        h.set_sampling(0.2, cfg_coef=3.0)
        torch.manual_seed(0)
        audio = h.generate(["drums, <v1>"])
    finally:
        handle.remove()
    assert torch.isfinite(audio).all() and audio.shape == (1, 1, 3200)
    hidden = seen[0]  # our hook ran before this one: [2, text + 2, D]
    assert hidden.shape[0] == 2
    torch.testing.assert_close(hidden[0, -2:], tokens)
    assert not torch.allclose(hidden[1, -2:], tokens)


def test_melody_guidance_gives_the_null_half_no_identifier():
    """The melody model projects the text before it doubles the batch for guidance: the identifier rows are written
    into the conditional half, and the decoder's prefix for the null half holds none of them."""
    h = _host(name="hf-tiny-random-melody")
    tokens = torch.randn(2, h.model.config.decoder.hidden_size)
    h.identifier_bank().add("<v1>", tokens)
    prefixes = []
    handle = h.model.decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: prefixes.append(kwargs.get("encoder_hidden_states")), with_kwargs=True)
    try:
        h.set_sampling(0.2, cfg_coef=3.0)
        torch.manual_seed(0)
        audio = h.generate(["drums, <v1>"])
    finally:
        handle.remove()
    assert torch.isfinite(audio).all() and audio.shape == (1, 1, 3200)
    prefix = next(p for p in prefixes if p is not None)  # [2, chroma + text + 2, D]
    assert prefix.shape[0] == 2
    torch.testing.assert_close(prefix[0, -2:], tokens)
    assert not torch.allclose(prefix[1, -2:], tokens)


@pytest.mark.parametrize("name", NAMES)
def test_tune_changes_only_pivots_and_a_concept_file_reproduces_the_logits(ref_wav, tmp_path, name):
    losses = []
    result = tune_model(ref_wav, model=name, callback=lambda s, v: losses.append(v), lr=3e-2, **FAST)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls
    base, tokenizer = _base(name)
    tuned = result.model
    piv = result.pivots["<v1>"]
    assert piv.count > 0 and all(n.startswith("decoder.") for n, i in piv if i.numel())
    want_layout = ("self_attn.k_proj", "self_attn.v_proj") if name.endswith("-melody") else (
        "self_attn.v_proj", "encoder_attn.k_proj", "encoder_attn.v_proj")  # fmt: skip
    assert all(n.endswith(tuple(f"{w}.weight" for w in want_layout)) for n, i in piv if i.numel())
    changed = 0
    for (n, p), q in zip(tuned.named_parameters(), base.parameters()):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if n in piv.names:
            mask[piv.indices_of(n).long()] = True
        assert torch.equal(p.detach().reshape(-1)[~mask], q.detach().reshape(-1)[~mask]), n
        changed += int((p.detach().reshape(-1)[mask] != q.detach().reshape(-1)[mask]).sum())
    assert changed > 0
    concept = Concept.capture(result, "<v1>")
    concept.save(tmp_path / "v1.ppt")
    assert Concept.load(tmp_path / "v1.ppt").meta["host"] == "transformers"  # the file records the host
    fresh = _host(name=name)
    codes = torch.randint(0, 64, (2, 4, 10), generator=torch.Generator().manual_seed(5))
    prompts = ["<v1>, a piece of music", "a piece of music"]
    with torch.no_grad():
        want = TransformersHost(tuned, tokenizer, "tiny-random").loss(codes, prompts)
        Concept.load(tmp_path / "v1.ppt").apply(fresh.model)
        got = fresh.loss(codes, prompts)
    assert torch.equal(got, want)
    # generation with and without the concept differs and is finite
    a = ppt_fast.generate(["<v1>, a piece of music"], model=_host(name=name).model, concepts=[tmp_path / "v1.ppt"],
                          duration=0.3, seed=1)  # fmt: skip
    b = ppt_fast.generate(["a piece of music"], model=_host(name=name).model, duration=0.3, seed=1)
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and not torch.equal(a, b)
    # the wrong base model is refused by the fingerprint
    with pytest.raises(ppt_fast.ConceptError):
        Concept.load(tmp_path / "v1.ppt").apply(_host(seed=1, name=name).model)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("preset", ["dreamstyler", "full", "tokens"])
def test_recipes_resolve_through_the_layout(ref_wav, preset, name):
    result = tune_model(ref_wav, model=name, preset=preset, **dict(FAST, steps=3))
    base = _base(name)[0]
    moved = {n for (n, p), q in zip(result.model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert all(n.startswith(("decoder.", "enc_to_dec_proj.")) for n in moved)  # never the T5 encoder or EnCodec
    if preset == "dreamstyler" and name.endswith("-melody"):  # self-attention k / v dense, q sparse
        assert set(result.dense_rows) == {n for n, _ in base.named_parameters()
                                          if n.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))}
        assert any(n.endswith("self_attn.q_proj.weight") for n in moved)
    elif preset == "dreamstyler":
        assert set(result.dense_rows) == {n for n in result.dense_rows if ".encoder_attn." in n} and result.dense_rows
        assert any(".encoder_attn.k_proj." in n for n in moved)
    if preset == "full":
        assert any("lm_heads" in n for n in moved) and any("enc_to_dec_proj" in n for n in moved)
    if preset == "tokens":
        assert not moved and result.tokens["<v1>"].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(identifier="v 1"), "one non-empty word"),
        (dict(preset="lora"), "preset"),
        (dict(ratio=2.0), "ratio"),
        (dict(activation_checkpointing=True, steps=1), "activation_checkpointing"),
    ],
)
def test_bad_inputs_are_the_same_clear_errors(ref_wav, kwargs, match):
    with pytest.raises(ppt_fast.TuneError, match=match):
        ppt_fast.tune(ref_wav, model="hf-tiny-random", **dict(FAST, **kwargs))


def test_silent_reference_is_refused(tmp_path):
    path = tmp_path / "silent.wav"
    write_wav(str(path), torch.zeros(1, 32000), 16000)
    with pytest.raises(ppt_fast.AudioError, match="silent"):
        ppt_fast.tune(str(path), model="hf-tiny-random", **FAST)


def test_text_embedding_is_in_the_decoder_space():
    h = _host()
    e = h.text_embedding("music")
    assert e.shape == (1, h.model.config.decoder.hidden_size) and math.isfinite(float(e.sum()))


def test_trainer_example_in_the_docs_runs(tmp_path):
    """docs/transformers.md's Trainer example, executed as written: only pivots move, the loss is finite."""
    pytest.importorskip("accelerate")
    import os
    import re

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "transformers.md")).read()
    code = re.search(r"<!-- trainer-example -->\n```python\n(.*?)```", doc, re.S).group(1)
    model, tokenizer = build_tiny_random(seed=0)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    scope = dict(model=model, tokenizer=tokenizer, codes=torch.randint(0, 64, (6, 4, 12), generator=g),
                 prompts=["a piece of music", "fast drums", "slow piano"] * 2, output_dir=str(tmp_path))  # fmt: skip
    exec(compile(code, "docs/transformers.md", "exec"), scope)
    pivots = scope["pivots"]
    assert pivots.count > 0
    history = [e["loss"] for e in scope["trainer"].state.log_history if "loss" in e]
    assert history and all(math.isfinite(v) for v in history)
    moved = 0
    for n, p in model.named_parameters():
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if n in pivots.names:
            mask[pivots.indices_of(n).long()] = True
        assert torch.equal(p.detach().reshape(-1)[~mask], base[n].reshape(-1)[~mask]), n
        moved += int((p.detach().reshape(-1)[mask] != base[n].reshape(-1)[mask]).sum())
    assert moved > 0


@pytest.mark.slow
def test_musicgen_small_shapes_tune_step(ref_wav):
    """One tune step on a random transformers MusicGen with musicgen-small's decoder shapes (24 layers, dim 1024,
    behind a t5-base-shaped encoder): only pivots move, the loss is finite."""
    result = tune_model(ref_wav, model="hf-musicgen-small-shapes", steps=1, sensitivity_batches=1, batch_size=1,
                        segment_seconds=1.0, verbose=False, use_cache=False, ratio=0.01)  # fmt: skip
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    piv = result.pivots["<v1>"]
    n_scope = sum(p.numel() for n, p in result.model.named_parameters()
                  if n.endswith(("self_attn.v_proj.weight", "encoder_attn.k_proj.weight", "encoder_attn.v_proj.weight"))
                  and n.startswith("decoder."))  # fmt: skip
    assert piv.count == round(0.01 * n_scope)
    assert sum(p.numel() for n, p in result.model.named_parameters() if n.startswith("decoder.")) > 400_000_000
