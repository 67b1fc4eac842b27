"""Portable concepts: a concept tuned on a MusicGen through audiocraft applies to the same checkpoint loaded through
transformers (and back), and `ppt-fast concept convert` writes the converted file.

The twin: a random audiocraft LMModel with MusicGen's settings (no biases, norm-first, GELU, sinusoidal positions,
a text projection 32 -> 48) and a transformers MusicgenForConditionalGeneration whose decoder and `enc_to_dec_proj`
are loaded from it through the name map (`ppt_fast.concept.portable`), as transformers' own conversion script does.
Both are fed the same condition (the projected text encoding, identifier tokens appended): their logits agree.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("audiocraft")

from ppt_fast.concept import Concept, ConceptError, FingerprintMismatch, fingerprint_model, portable  # noqa: E402
from ppt_fast.pivots import PivotSet  # noqa: E402

D, HEADS, LAYERS, K, CARD, TEXT = 48, 4, 2, 4, 64, 32


def _audiocraft_lm(seed: int = 0):
    from ppt_fast.hosts.audiocraft.build import _lm

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lm = _lm(D, HEADS, LAYERS, n_q=K, card=CARD, lut_bins=128, lut_dim=TEXT, musicgen=True, cfg_dropout=0.0,
                 dropout=0.0)  # fmt: skip
        for p in lm.parameters():  # norms and the projection's bias off their init, so a wrong map shows
            if p.dim() == 1:
                p.data.add_(0.1 * torch.randn_like(p))
    from ppt_fast.hosts.audiocraft.patches import install_identifiers

    install_identifiers(lm)
    return lm.eval()


def _transformers_twin(lm):
    from ppt_fast.hosts.transformers.build import WordHashTokenizer, _config, _random_model

    tok = WordHashTokenizer(vocab_size=128)
    cfg = _config(
        dict(vocab_size=tok.vocab_size, d_model=TEXT, d_kv=8, d_ff=64, num_layers=1, num_heads=4),
        dict(sampling_rate=16000, audio_channels=1, num_filters=8, upsampling_ratios=[8, 5, 4, 2], codebook_size=CARD,
             hidden_size=16, codebook_dim=16, target_bandwidths=[1.2], num_residual_layers=1, num_lstm_layers=1),
        dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=4 * D, num_codebooks=K,
             max_position_embeddings=512),
    )  # fmt: skip
    model, _ = _random_model(cfg, tok, "hf-twin", seed=1, device="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in lm.named_parameters():
            if name.startswith("condition_provider.") and "output_proj" not in name:
                continue  # the LUT table: the text encoder, not part of the map
            targets = portable.to_transformers(name)
            for j, piece in enumerate(t.chunk(len(targets), 0)):
                params[targets[j]].copy_(piece)
    from ppt_fast.hosts.transformers.patches import install_identifiers

    install_identifiers(model)
    return model.eval()


def _condition(seed: int = 2, batch: int = 2, n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, TEXT, generator=g), torch.randint(0, CARD, (batch, K, 12), generator=g)


def _logits_audiocraft(lm, x, codes, tokens=None):
    with torch.no_grad():
        cond = lm.condition_provider.conditioners["description"].output_proj(x)
        if tokens is not None:
            cond = torch.cat([cond, tokens.expand(cond.shape[0], -1, -1)], 1)
        mask = torch.ones(cond.shape[:2])
        return lm(codes, [], {"description": (cond, mask)})  # [B, K, T, card]


def _logits_transformers(model, x, codes, tokens=None):
    with torch.no_grad():
        cond = model.enc_to_dec_proj(x)
        if tokens is not None:
            cond = torch.cat([cond, tokens.expand(cond.shape[0], -1, -1)], 1)
        mask = torch.ones(cond.shape[:2], dtype=torch.long)
        out = model.decoder(input_ids=codes.reshape(-1, codes.shape[-1]), encoder_hidden_states=cond,
                            encoder_attention_mask=mask)  # fmt: skip
        return out.logits.reshape(codes.shape[0], K, codes.shape[-1], -1)


def _concept(lm, seed: int = 3) -> Concept:
    """A concept in audiocraft's names, as `ppt` + dreamstyler lay them out: pivots in the self-attention's v rows and
    the cross-attention's k / v rows, dense cross-attention k / v rows of one layer, a projection bias, 3 tokens."""
    g = torch.Generator().manual_seed(seed)
    params = dict(lm.named_parameters())
    attns = ("self_attn", "cross_attention")
    names = [f"transformer.layers.{i}.{a}.in_proj_weight" for i in range(LAYERS) for a in attns]
    idx_parts, counts = [], [0]
    for n in names:
        lo = (2 if "self_attn" in n else 1) * D * D  # v rows / k+v rows
        hi = 3 * D * D
        pick = torch.unique(torch.randint(lo, hi, (40,), generator=g))
        idx_parts.append(pick.to(torch.int32))
        counts.append(pick.numel())
    piv = PivotSet(names, [tuple(params[n].shape) for n in names], torch.tensor(counts).cumsum(0), torch.cat(idx_parts))
    vals = torch.cat([params[n].detach().reshape(-1)[i.long()] for n, i in zip(names, idx_parts)])
    vals = vals + 0.05 * torch.randn(vals.shape, generator=g)
    dn = "transformer.layers.1.cross_attention.in_proj_weight"
    bias = "condition_provider.conditioners.description.output_proj.bias"
    dense = {dn: params[dn].detach()[D : 3 * D] + 0.05 * torch.randn(2 * D, D, generator=g),
             bias: params[bias].detach() + 0.05 * torch.randn(D, generator=g)}  # fmt: skip
    touched = sorted(set(names) | set(dense))
    return Concept(["<v1>"], {"<v1>": torch.randn(3, D, generator=g)}, piv, vals, dense=dense,
                   dense_rows={dn: (D, 3 * D), bias: None}, fingerprint=fingerprint_model(lm, touched),
                   meta={"host": "audiocraft", "preset": "test"})  # fmt: skip


@pytest.fixture(scope="module")
def twins():
    lm = _audiocraft_lm()
    return lm, _transformers_twin(lm)


def test_the_name_map_covers_every_decoder_tensor(twins):
    lm, hf = twins
    mapped = set()
    for name, _ in lm.named_parameters():
        if name.startswith("condition_provider.") and "output_proj" not in name:
            continue
        targets = portable.to_transformers(name)
        mapped |= set(targets)
        assert {portable.to_audiocraft(t)[0] for t in targets} == {name}
        assert [portable.to_audiocraft(t)[1] for t in targets] == list(range(len(targets)))
    hf_lm = {n for n, _ in hf.named_parameters() if n.startswith(("decoder.", "enc_to_dec_proj."))}
    assert mapped == hf_lm
    assert portable.layout_of_names(dict(lm.named_parameters())) == "audiocraft"
    assert portable.layout_of_names(dict(hf.named_parameters())) == "transformers"
    with pytest.raises(ConceptError, match="no counterpart"):
        portable.to_transformers("transformer.layers.0.self_attn.rope.freqs")


def test_twins_give_the_same_logits(twins):
    lm, hf = twins
    x, codes = _condition()
    a, b = _logits_audiocraft(lm, x, codes), _logits_transformers(hf, x, codes)
    assert a.shape == b.shape == (2, K, 12, CARD)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - _logits_audiocraft(_audiocraft_lm(seed=5), x, codes)).abs().max() > 0.1  # the check can fail


def test_a_concept_tuned_through_audiocraft_applies_through_transformers(twins, caplog):
    lm, hf = twins
    c = _concept(lm)
    x, codes = _condition()
    base_hf = {n: p.detach().clone() for n, p in hf.named_parameters()}
    c.apply(lm)
    with caplog.at_level("INFO", logger="ppt_fast.concept.portable"):
        c.apply(hf)  # converted on the fly: the fingerprint is checked against hf's tensors
    assert any("converting it" in r.getMessage() for r in caplog.records)
    try:
        tok = c.tokens["<v1>"]
        a, b = _logits_audiocraft(lm, x, codes, tok), _logits_transformers(hf, x, codes, tok)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # the tensors themselves: every applied hf tensor is the applied audiocraft tensor, bitwise
        params = dict(hf.named_parameters())
        for name, t in lm.named_parameters():
            if name.startswith("condition_provider.") and "output_proj" not in name:
                continue
            targets = portable.to_transformers(name)
            assert torch.equal(torch.cat([params[n].detach() for n in targets]), t.detach()), name
        assert hf._ppt_fast_identifier_bank.has("<v1>") and lm._ppt_fast_identifier_bank.has("<v1>")
    finally:
        c.remove(lm)
        c.remove(hf)
    assert all(torch.equal(p, base_hf[n]) for n, p in hf.named_parameters())  # removed bitwise


def test_convert_there_and_back_is_the_same_concept(twins, tmp_path):
    lm, hf = twins
    c = _concept(lm)
    h = portable.convert(c, hf)
    assert h.meta["host"] == "transformers" and h.meta["converted_from"]["host"] == "audiocraft"
    assert all(n.startswith(("decoder.model.decoder.layers.", "enc_to_dec_proj.")) for n in h.touched_names())
    assert "decoder.model.decoder.layers.0.self_attn.q_proj.weight" not in h.pivots.names  # only v rows there
    assert h.pivots.count == c.pivots.count and h.dense_rows["enc_to_dec_proj.bias"] is None
    h.save(tmp_path / "h.ppt")
    back = portable.convert(Concept.load(tmp_path / "h.ppt"), lm)
    assert back.pivots.equal(c.pivots) and torch.equal(back.values, c.values)
    assert back.dense_rows == c.dense_rows and all(torch.equal(back.dense[n], c.dense[n]) for n in c.dense)
    assert back.fingerprint == c.fingerprint and torch.equal(back.tokens["<v1>"], c.tokens["<v1>"])
    assert portable.convert(c, lm) is c  # already in lm's names


def test_convert_refuses_another_checkpoint(twins, caplog):
    lm, hf = twins
    c = _concept(lm)
    other = _transformers_twin(_audiocraft_lm())
    with torch.no_grad():
        other.decoder.model.decoder.layers[1].encoder_attn.k_proj.weight[0, 0] += 1e-3
    with pytest.raises(FingerprintMismatch, match=r"another checkpoint.*cross_attention.in_proj_weight"):
        portable.convert(c, other)
    with pytest.raises(FingerprintMismatch):
        c.apply(other)
    with caplog.at_level("WARNING"):
        forced = portable.convert(c, other, force=True)
    assert forced.meta["converted_from"]["fingerprint_checked"] is False and "force=True" in caplog.text
    with pytest.raises(ConceptError, match="cannot be converted"):
        portable.convert(c, torch.nn.Linear(2, 2))


def test_a_transformers_concept_with_gapped_dense_rows_joins_them(twins):
    """q and v of one attention trained densely (k not): one row range on the audiocraft side, k's rows at base."""
    lm, hf = twins
    params = dict(hf.named_parameters())
    pre = "decoder.model.decoder.layers.0.self_attn."
    dense = {pre + "q_proj.weight": params[pre + "q_proj.weight"].detach() + 1.0,
             pre + "v_proj.weight": params[pre + "v_proj.weight"].detach() - 1.0}  # fmt: skip
    c = Concept(["<v2>"], {}, PivotSet.empty([], []), torch.zeros(0), dense=dense,
                fingerprint=fingerprint_model(hf, sorted(dense)), meta={"host": "transformers"})  # fmt: skip
    ac = portable.convert(c, lm)
    n = "transformer.layers.0.self_attn.in_proj_weight"
    base = dict(lm.named_parameters())[n].detach()
    assert list(ac.dense) == [n] and ac.dense_rows[n] is None
    assert torch.equal(ac.dense[n][:D], base[:D] + 1.0) and torch.equal(ac.dense[n][D : 2 * D], base[D : 2 * D])
    assert torch.equal(ac.dense[n][2 * D :], base[2 * D :] - 1.0)


def _audiocraft_twin_of(hf):
    """An audiocraft LMModel holding `hf`'s decoder and projection (the map read backwards)."""
    from ppt_fast.hosts.audiocraft.build import _lm

    dc = hf.config.decoder
    lm = _lm(dc.hidden_size, dc.num_attention_heads, dc.num_hidden_layers, n_q=dc.num_codebooks, card=dc.vocab_size,
             lut_bins=128, lut_dim=hf.config.text_encoder.d_model, musicgen=True, cfg_dropout=0.0, dropout=0.0,
             hidden_scale=dc.ffn_dim // dc.hidden_size)  # fmt: skip
    params = dict(lm.named_parameters())
    with torch.no_grad():
        for name, t in hf.named_parameters():
            if not name.startswith(("decoder.", "enc_to_dec_proj.")):
                continue
            ac, third = portable.to_audiocraft(name)
            params[ac][third * t.shape[0] : (third + 1) * t.shape[0]].copy_(t)
    from ppt_fast.hosts.audiocraft.patches import install_identifiers

    install_identifiers(lm)
    return lm.eval()


def test_a_concept_tuned_through_transformers_applies_through_audiocraft():
    """A real tune() run on the transformers host (dreamstyler: pivots and dense rows), applied to the audiocraft
    twin: the same logits on both sides, and the converted file converts back to the tuned concept exactly."""
    import ppt_fast
    from ppt_fast.hosts.transformers.build import build_tiny_random

    hf, _ = build_tiny_random(seed=0)
    base = {n: p.detach().clone() for n, p in hf.named_parameters()}
    ref = torch.randn(1, 16000 * 3) * 0.1
    c = ppt_fast.tune((ref, 16000), model=hf, preset="dreamstyler", steps=3, seed=0, verbose=False)
    assert c.meta["host"] == "transformers" and c.dense and c.pivots.count
    c.remove(hf)  # tune() tuned hf in place
    assert all(torch.equal(p, base[n]) for n, p in hf.named_parameters())
    lm = _audiocraft_twin_of(hf)
    ac = portable.convert(c, lm)
    assert all(n.startswith("transformer.layers.") or n.startswith("condition_provider.") for n in ac.touched_names())
    x = torch.randn(2, 5, hf.config.text_encoder.d_model)
    codes = torch.randint(0, hf.config.decoder.vocab_size, (2, hf.config.decoder.num_codebooks, 10))
    tok = c.tokens["<v1>"]
    before = _logits_transformers(hf, x, codes, tok)
    torch.testing.assert_close(_logits_audiocraft(lm, x, codes, tok), before, rtol=1e-4, atol=1e-4)
    c.apply(hf)
    ac.apply(lm)
    tuned_a, tuned_h = _logits_audiocraft(lm, x, codes, tok), _logits_transformers(hf, x, codes, tok)
    torch.testing.assert_close(tuned_a, tuned_h, rtol=1e-4, atol=1e-4)
    assert (tuned_h - before).abs().max() > 1e-4  # the concept's weights change the logits: the check can fail
    back = portable.convert(ac, hf)
    assert back.pivots.equal(c.pivots) and torch.equal(back.values, c.values)
    assert {n: back.dense_rows[n] for n in back.dense} == {n: c.dense_rows[n] for n in c.dense}
    assert all(torch.equal(back.dense[n], c.dense[n]) for n in c.dense)


def test_concept_convert_cli(twins, tmp_path, capsys):
    """`ppt-fast concept convert` writes the transformers file; generating with it equals generating with the
    audiocraft file (converted on the fly), same seed; `concept info` shows both; bad uses are refused."""
    import ppt_fast
    from ppt_fast.cli import main

    lm, hf = twins
    src = tmp_path / "ac.ppt"
    _concept(lm).save(src)
    hf.save_pretrained(tmp_path / "twin")
    out = tmp_path / "hf.ppt"
    assert main(["concept", "convert", str(src), "--model", str(tmp_path / "twin"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "audiocraft -> transformers, fingerprint checked" in text and f"wrote {out}" in text
    conv = Concept.load(out)
    assert conv.meta["host"] == "transformers" and not conv.unverified_names()
    a = ppt_fast.generate(["a piece of music, <v1>"], model=str(tmp_path / "twin"), concepts=[out], duration=0.3,
                          seed=4)  # fmt: skip
    b = ppt_fast.generate(["a piece of music, <v1>"], model=str(tmp_path / "twin"), concepts=[src], duration=0.3,
                          seed=4)  # fmt: skip
    assert torch.isfinite(a).all() and torch.equal(a, b)
    assert main(["concept", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "library transformers (converted from audiocraft)" in info and "fingerprint: complete" in info
    assert "decoder.model.decoder.layers.1.encoder_attn.k_proj.weight: dense all" in info
    # refused: FILE as --out, a file already in the target's library, a missing file
    assert main(["concept", "convert", str(out), "--model", str(tmp_path / "twin"), "--out", str(out)]) == 2
    assert "is FILE itself" in capsys.readouterr().err
    assert main(["concept", "convert", str(out), "--model", str(tmp_path / "twin"), "--out", str(tmp_path / "x")]) == 2
    assert "already in --model's library (transformers)" in capsys.readouterr().err
    assert main(["concept", "info", str(tmp_path / "nope.ppt")]) == 2
    assert "does not exist" in capsys.readouterr().err
