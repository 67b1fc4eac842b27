import pytest
import torch

pytest.importorskip("audiocraft")

from ppt_fast import identifiers as ids  # noqa: E402
from ppt_fast.hosts.audiocraft.patches import install_identifiers, uninstall_identifiers  # noqa: E402
from ppt_fast.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", device="cpu")


def _attrs(texts):
    from audiocraft.modules.conditioners import ConditioningAttributes

    return [ConditioningAttributes(text={"description": t}) for t in texts]


def test_split_and_clean():
    bank = ids.IdentifierBank(8)
    bank.add("<v1>", torch.randn(3, 8))
    bank.add("<v10>", torch.randn(2, 8))
    assert bank.split("a piece of music, <v1>") == ("a piece of music", ["<v1>"])
    assert bank.split("<v10>, <v1>, electronic dance music") == ("electronic dance music", ["<v10>", "<v1>"])
    assert bank.split("jazz") == ("jazz", [])
    assert bank.split(None) == (None, [])
    assert ids.clean_prompt(" a ,  , b , ") == "a, b"


def test_bank_interface_and_errors():
    bank = ids.IdentifierBank(4)
    assert not bank.has("<v1>") and bank.identifiers() == []
    bank.add("<v1>", torch.zeros(3, 4))
    assert bank.has("<v1>") and bank.identifiers() == ["<v1>"]
    with pytest.raises(ValueError, match=r"\[n_tokens, 4\]"):
        bank.add("<v2>", torch.zeros(3, 5))
    with pytest.raises(ValueError, match="one non-empty word"):
        bank.add("v 1", torch.zeros(3, 4))
    bank.remove("<v1>")
    with pytest.raises(KeyError, match="not registered"):
        bank.remove("<v1>")


def test_collisions():
    assert ids.find_collisions("<v1>", ["a piece of music, {}"]) == []
    assert ids.find_collisions("<jazz>", ["smooth jazz, {}"]) == [("smooth jazz, {}", "jazz")]


def test_condition_gets_tokens_appended(tiny):
    lm = tiny.lm
    bank = ids.get_bank(lm)
    emb = torch.randn(3, bank.dim)
    bank.add("<v1>", emb)
    try:
        prov = lm.condition_provider
        attrs = _attrs(["a piece of music, <v1>", "a piece of music"])
        before = [a.text["description"] for a in attrs]
        cond, mask = prov(prov.tokenize(attrs))["description"]
        assert [a.text["description"] for a in attrs] == before  # the caller's attributes are not mutated
        plain, pmask = prov(prov.tokenize(_attrs(["a piece of music"])))["description"]
        T = plain.shape[1]
        assert cond.shape[1] == T + 3
        assert torch.equal(cond[0, :T], plain[0]) and torch.equal(cond[0, T:], emb)
        assert mask[0].tolist() == pmask[0].tolist() + [1, 1, 1]
        # The sample without an identifier gets zero padding with mask 0 (audiocraft's own padding convention).
        assert torch.equal(cond[1, T:], torch.zeros(3, bank.dim)) and mask[1, T:].sum() == 0
        # Null (CFG) conditions carry no identifier.
        from audiocraft.modules.conditioners import ConditioningAttributes

        n, nmask = prov(prov.tokenize([ConditioningAttributes(text={"description": None})]))["description"]
        assert n.shape[1] == 1 and nmask.sum() == 0
    finally:
        bank.remove("<v1>")


def test_appending_equals_placing(tiny):
    """Cross-attention has no positional term on its source: tokens appended == tokens at the identifier's place."""
    lm = tiny.lm
    bank = ids.get_bank(lm)
    emb = torch.randn(3, bank.dim)
    bank.add("<v1>", emb)
    try:
        prov = lm.condition_provider
        codes = torch.randint(0, lm.card, (1, lm.n_q, 20))
        with torch.no_grad():
            appended = prov(prov.tokenize(_attrs(["bright <v1> synth lead"])))
            out_a = lm.compute_predictions(codes, [], appended)
            valid = out_a.mask  # the delay pattern leaves NaN logits where no target exists
            logits_a = out_a.logits[valid]
            text, tmask = prov(prov.tokenize(_attrs(["bright synth lead"])))["description"]
            # Place the three tokens after the first word instead of at the end.
            placed = torch.cat([text[:, :1], emb[None], text[:, 1:]], 1)
            pmask = torch.cat([tmask[:, :1], torch.ones(1, 3, dtype=tmask.dtype), tmask[:, 1:]], 1)
            logits_p = lm.compute_predictions(codes, [], {"description": (placed, pmask)}).logits[valid]
            logits_0 = lm.compute_predictions(codes, [], {"description": (text, tmask)}).logits[valid]
        # fp32 attention over a permuted source: equal up to summation order (~1e-6); the identifier's effect is
        # orders of magnitude larger.
        torch.testing.assert_close(logits_a, logits_p, rtol=1e-5, atol=1e-5)
        assert (logits_a - logits_0).abs().max() > 1e-3
    finally:
        bank.remove("<v1>")


def test_install_is_idempotent_and_revertible():
    m = load_model("tiny-random")
    lm = m.lm
    cls = type(lm.condition_provider)
    assert install_identifiers(lm) is ids.get_bank(lm)
    assert ids.BANK_ATTR not in dict(lm.named_modules())
    assert all(not n.startswith(ids.BANK_ATTR) for n in lm.state_dict())
    uninstall_identifiers(lm)
    assert type(lm.condition_provider) is not cls and not hasattr(lm, ids.BANK_ATTR)
    with pytest.raises(RuntimeError, match="no identifier bank"):
        ids.get_bank(lm)
