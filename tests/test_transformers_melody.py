"""The transformers host on `MusicgenMelodyForConditionalGeneration` (`hf-tiny-random-melody`, built in code).

The melody decoder has no cross-attention: the chroma and the text encoding (identifier tokens appended, after
`enc_to_dec_proj`) are prepended to the audio sequence and read through self-attention, so `ppt` selects pivots over
the self-attention `k_proj` / `v_proj`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import ppt_fast  # noqa: E402
from ppt_fast import Concept  # noqa: E402
from ppt_fast.audio import synth_reference, write_wav  # noqa: E402
from ppt_fast.hosts.transformers import TransformersHost  # noqa: E402
from ppt_fast.hosts.transformers.build import build_tiny_random  # noqa: E402
from ppt_fast.models import load_host, model_kind  # noqa: E402
from ppt_fast.tuning import tune_model  # noqa: E402

NAME = "hf-tiny-random-melody"
FAST = dict(steps=12, sensitivity_batches=2, batch_size=2, segment_seconds=1.0, verbose=False, use_cache=False)


@pytest.fixture(scope="module")
def ref_wav(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    write_wav(str(path), synth_reference(6.0, 16000, seed=3, timbre="pluck"), 16000)
    return str(path)


def _host(seed: int = 0) -> TransformersHost:
    return load_host(NAME, seed=seed)


def test_resolution_kind_and_layout(tmp_path):
    h = _host()
    assert type(h.model).__name__ == "MusicgenMelodyForConditionalGeneration"
    assert h.kind == "tiny-random" == model_kind(NAME) and h.melody
    names = [n for n, _ in h.model.named_parameters()]
    assert not any("encoder_attn" in n for n in names)  # no cross-attention to put pivots on
    h.model.save_pretrained(tmp_path / "saved")
    again = load_host(str(tmp_path / "saved"))
    assert type(again.model).__name__ == "MusicgenMelodyForConditionalGeneration"


def test_loss_is_the_delay_pattern_cross_entropy_after_the_prefix():
    h = _host()
    m = h.model
    B, K, F = 2, 4, 9
    pad = m.config.decoder.pad_token_id
    codes = torch.randint(0, 64, (B, K, F), generator=torch.Generator().manual_seed(0))
    prompts = ["a piece of music", "fast drums"]
    loss = h.loss(codes, prompts)
    steps = F + K - 1
    dec_in = torch.full((B, K, steps), pad, dtype=torch.long)
    for k in range(K):
        dec_in[:, k, k + 1 : k + 1 + F] = codes[:, k, : min(F, steps - k - 1)]
    enc = h.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                decoder_input_ids=dec_in.reshape(B * K, steps))  # fmt: skip
    logits = out.logits.reshape(B, K, -1, out.logits.shape[-1])[:, :, -steps:]  # the audio steps, after the prefix
    ce = torch.nn.functional.cross_entropy
    want = sum(ce(logits[:, k, k : k + F].reshape(-1, logits.shape[-1]), codes[:, k].reshape(-1)) for k in range(K)) / K
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)


def test_identifier_anywhere_gives_the_same_logits_and_reaches_the_decoder():
    h = _host()
    h.identifier_bank().add("<v1>", torch.randn(3, h.model.config.decoder.hidden_size))
    codes = torch.randint(0, 64, (1, 4, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = h.loss(codes, ["<v1>, a piece of music"])
        b = h.loss(codes, ["a piece of music, <v1>"])
        c = h.loss(codes, ["a piece <v1> of music"])
        base = h.loss(codes, ["a piece of music"])
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, base)
    h.identifier_bank().remove("<v1>")
    with torch.no_grad():
        assert torch.equal(h.loss(codes, ["a piece of music"]), base)


def test_guidance_gives_the_unconditional_half_no_identifier():
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
        h.identifier_bank().remove("<v1>")
    assert torch.isfinite(audio).all() and audio.shape == (1, 1, 3200)
    torch.testing.assert_close(seen[0][0, -2:], tokens)  # written before the null half is concatenated


def test_tune_changes_only_pivots_and_a_concept_file_reproduces_the_logits(ref_wav, tmp_path):
    losses = []
    result = tune_model(ref_wav, model=NAME, callback=lambda s, v: losses.append(v), lr=3e-2, **FAST)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    base = build_tiny_random(seed=0, melody=True)[0]
    piv = result.pivots["<v1>"]
    assert piv.count > 0
    assert {n.rsplit(".", 2)[-2] for n, i in piv if i.numel()} <= {"k_proj", "v_proj"}
    assert all(".self_attn." in n for n, i in piv if i.numel())
    for (n, p), q in zip(result.model.named_parameters(), base.parameters()):
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        if n in piv.names:
            mask[piv.indices_of(n).long()] = True
        assert torch.equal(p.detach().reshape(-1)[~mask], q.detach().reshape(-1)[~mask]), n
    concept = Concept.capture(result, "<v1>")
    concept.save(tmp_path / "v1.ppt")
    codes = torch.randint(0, 64, (2, 4, 10), generator=torch.Generator().manual_seed(5))
    prompts = ["<v1>, a piece of music", "a piece of music"]
    fresh = _host()
    with torch.no_grad():
        want = TransformersHost(result.model, build_tiny_random(seed=0, melody=True)[1], "tiny-random").loss(
            codes, prompts)  # fmt: skip
        Concept.load(tmp_path / "v1.ppt").apply(fresh.model)
        got = fresh.loss(codes, prompts)
    assert torch.equal(got, want)
    a = ppt_fast.generate(["<v1>, a piece of music"], model=_host().model, concepts=[tmp_path / "v1.ppt"],
                          duration=0.3, seed=1)  # fmt: skip
    b = ppt_fast.generate(["a piece of music"], model=_host().model, duration=0.3, seed=1)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    with pytest.raises(ppt_fast.ConceptError):
        Concept.load(tmp_path / "v1.ppt").apply(_host(seed=1).model)


@pytest.mark.parametrize("preset", ["dreamstyler", "full", "tokens"])
def test_recipes_resolve_through_the_melody_layout(ref_wav, preset):
    result = tune_model(ref_wav, model=NAME, preset=preset, **dict(FAST, steps=3))
    base = build_tiny_random(seed=0, melody=True)[0]
    changed = {n for (n, p), q in zip(result.model.named_parameters(), base.parameters()) if not torch.equal(p, q)}
    assert all(n.startswith(("decoder.", "enc_to_dec_proj.")) for n in changed)
    if preset == "dreamstyler":
        assert {n for n in changed if not n.endswith("self_attn.q_proj.weight")} == {
            n for n, _ in base.named_parameters() if n.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight"))}
        assert any(n.endswith("self_attn.q_proj.weight") for n in changed)  # the sparse part
    if preset == "tokens":
        assert not changed
