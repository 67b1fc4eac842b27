"""One end-to-end tuning step on a MusicGen-shaped model, in a fresh process: step time and peak memory.

    python benchmarks/tune_probe.py '{"model": "tiny"|"small"|"medium", "method": "dense_masked"|"ppt_fast",
                                      "phase": "train"|"sensitivity", "density": 0.01, "device": "cpu",
                                      "seconds": 5.0, "steps": 3, "host": "audiocraft"|"transformers",
                                      "dtype": "float32"|"bfloat16"}'

Prints one JSON line. What runs (recipe `ppt`, DESIGN §6: pivots over self-attention V rows and cross-attention
K/V rows of every layer; the tensors that recipe trains are the 2 x num_layers `in_proj_weight`s):
- the batch: B = 1, `seconds` of random codes (4 codebooks) at the codec's frame rate, the prompt
  "a piece of music"; the loss is MusicGenSolver's cross-entropy through the host's `loss` (computed
  in the pattern's layout, `ppt_fast.hosts.audiocraft.loss.pattern_cross_entropy`; the same in both methods).
- phase `train`, method `dense_masked`: the trained tensors get full gradients and a dense masked AdamW step
  (ppt_fast.optim.DenseMaskedAdamW, fused torch AdamW where supported). Method `ppt_fast`: what `tune()` does:
  `SparseAdamW(gather_in_backward=True)` with row-scoped weight gradients (`ppt_fast.rowgrad`: only the rows
  holding pivots are computed, and their pivots gathered in backward; `"row_grads": false` turns that off and
  hooks gather from whole gradients instead); one `sparse_adamw_step` over all pivots (state for pivots only).
- phase `sensitivity`, method `dense_masked`: full gradients of the in-scope tensors are kept and then scored in
  one `torch._foreach_addcmul_`; `ppt_fast`: `SensitivityAccumulator` with row-scoped gradients (only the in-scope
  rows are computed and scored in backward; `"row_grads": false`: hooks score whole gradients and free them).
Pivots: uniformly random at `density` of the in-scope entries (what a global top-k over noise-like scores gives;
the real ones come from the sensitivity pass, which does not change time or memory). No identifier tokens: they
add 3 x dim parameters, the same to both methods. No gradient clipping in either method.
`"checkpointing": "torch"` turns on audiocraft's per-layer activation checkpointing (same for both methods).
Peak memory: CPU peak RSS (VmHWM reset after the model is built), GPU `torch.cuda.max_memory_allocated`; both
absolute (model included) and over the built model.
"""

from __future__ import annotations

import gc
import importlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parent.parent))

import cases  # noqa: E402
import provenance  # noqa: E402
import torch  # noqa: E402

MODELS = {"tiny": "tiny-random", "small": "musicgen-small-shapes", "medium": "musicgen-medium-shapes"}


def _build(model: str, device: str):
    from ppt_fast.hosts.audiocraft import build as models

    if model == "tiny":
        return models.build_tiny(seed=0, device=device)
    return models.build_shapes(MODELS[model], seed=0, device=device)


def _host(spec: dict):
    """The host the step runs on: audiocraft (default) or transformers (`"host": "transformers"`)."""
    device = spec["device"]
    if spec.get("host", "audiocraft") == "transformers":
        from ppt_fast.hosts.transformers import TransformersHost
        from ppt_fast.hosts.transformers import build as hf

        mg, tok = (hf.build_tiny_random(seed=0, device=device) if spec["model"] == "tiny" else
                   hf.build_shapes(f"hf-{MODELS[spec['model']]}", seed=0, device=device))  # fmt: skip
        return TransformersHost(mg, tok, "other")
    from ppt_fast.hosts.audiocraft import AudiocraftHost

    return AudiocraftHost(_build(spec["model"], device), "other")


PEERS = ("lora", "lora_matched", "shira")  # PEFT's arms (ppt_fast.eval.arms), transformers host


def _peer_arm(host, method: str, sparse, indices, offsets, k: int):
    """The PEFT arm `method` injected into the host's LM (in place), its torch AdamW and a label. `lora`: the
    musicgen-dreamboothing recipe; `lora_matched`: ppt's tensors, rank nearest ppt's k; `shira`: ppt's tensors,
    PEFT's sizing (r (m + n) entries per layer, r nearest ppt's k), the entries drawn uniformly like ppt's here."""
    import peft

    from ppt_fast.eval import arms, peers

    lm = host.lm
    arm = arms.get(method.replace("_", "-"))
    if method == "shira":
        r, per_layer = peers.shira_rank(host, k)
        g = torch.Generator().manual_seed(1)
        masks = {}
        for e in sparse:
            mask = torch.zeros(e.param.numel(), dtype=e.param.dtype)
            mask[torch.randperm(e.param.numel(), generator=g)[:per_layer]] = 1
            masks[id(e.param)] = mask.reshape(e.param.shape).to(e.param.device)
        config = peft.ShiraConfig(r=r, target_modules=[e.name.rpartition(".")[0] for e in sparse])
        config.mask_fn = lambda layer, r_, **_: masks[id(layer.weight)]
        label, lr = f"peft ShiraConfig(r={r}, {per_layer} entries per layer)", cases.LR
    else:
        targets = peers.lora_targets(host, arm)
        rank = arm.rank if method == "lora" else peers.matched_rank(host, targets, k)
        config = peers.lora_config(targets, rank=rank, alpha=arm.alpha, dropout=arm.dropout)
        label, lr = f"peft LoraConfig(r={rank}, alpha={config.lora_alpha}) on {len(targets)} tensors", arm.lr
    model = peft.get_peft_model(lm, config)
    for name, m in lm.named_modules():  # the recipe's dropout is active in training
        if isinstance(m, torch.nn.Dropout) and ".lora_dropout." in f"{name}.":
            m.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(cases.BETA1, cases.BETA2), eps=cases.EPS, weight_decay=cases.WD)
    return opt, f"{label}, torch.optim.AdamW (default implementation)", model


def _state_bytes(opt) -> int:
    if opt is None:
        return 0
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim())  # fmt: skip


def _file_sizes(host, phase: str, opt, peer, concept: tuple | None) -> dict:
    """What the user keeps and what the optimizer holds: the PEFT adapter folder (`save_pretrained`) for the peers,
    the concept file for ours (`concept` = (PivotSet of the sparse pivots, {name: dense rows}), + 3 identifier
    tokens; fp32 values, and bf16 in `file_bytes_bf16`); trainable entries; optimizer state bytes."""
    import os
    import tempfile

    out = {"optimizer_state_bytes": _state_bytes(opt)}
    if phase != "train":
        return out
    with tempfile.TemporaryDirectory() as tmp:
        if peer is not None:
            peer.save_pretrained(tmp)
            out["file"] = "PEFT adapter (save_pretrained)"
            out["trainable"] = sum(p.numel() for p in host.lm.parameters() if p.requires_grad)
        else:
            import logging

            from ppt_fast.concept import Concept

            logging.getLogger("ppt_fast.concept").setLevel(logging.ERROR)  # no base fingerprint: not needed here
            pivots, dense = concept
            dim = host.text_embedding("music").shape[-1]  # the identifier tokens' width
            kw = dict(identifiers=["<v1>"], tokens={"<v1>": torch.zeros(3, dim)}, dense=dense)
            Concept.capture(host.lm, pivots, storage_dtype=torch.bfloat16, **kw).save(os.path.join(tmp, "bf16.ppt"))
            out["file_bytes_bf16"] = os.path.getsize(os.path.join(tmp, "bf16.ppt"))  # values stored in bf16
            os.remove(os.path.join(tmp, "bf16.ppt"))
            Concept.capture(host.lm, pivots, **kw).save(os.path.join(tmp, "v1.ppt"))
            out["file"] = "concept file (Concept.save, fp32 values)"
            params = dict(host.lm.named_parameters())
            out["trainable"] = int(pivots.count) + sum(
                (params[n].numel() if r is None else (r[1] - r[0]) * params[n][0].numel()) for n, r in dense.items()
            )
        out["file_bytes"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    return out


def measure(spec: dict) -> dict:
    tune_mod = importlib.import_module("ppt_fast.tuning")  # the module (the package exports a function tune)

    device, method, phase = spec["device"], spec["method"], spec["phase"]
    density = float(spec.get("density", 0.01))
    cuda = device.startswith("cuda")
    host = _host(spec)
    lm = host.lm.eval()
    if spec.get("dtype", "float32") != "float32":  # e.g. "bfloat16": the weights themselves (autocast alone keeps fp32)
        lm.to(getattr(torch, spec["dtype"]))
    if spec.get("checkpointing", "none") != "none":  # audiocraft's per-layer activation checkpointing, both arms alike
        lm.transformer.checkpointing = spec["checkpointing"]
    for p in lm.parameters():
        p.requires_grad_(False)
    frames = int(round(spec.get("seconds", 5.0) * host.frame_rate))
    g = torch.Generator().manual_seed(0)
    card, n_q = ((lm.card, lm.num_codebooks) if host.library == "audiocraft" else
                 (lm.config.decoder.vocab_size, lm.decoder.num_codebooks))  # fmt: skip
    codes = torch.randint(0, card, (1, n_q, frames), generator=g).to(device)
    prompts = ["a piece of music"]
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cuda
        else (lambda: torch.autocast("cpu", enabled=False))
    )
    # `dreamstyler`: ppt_fast's optimizer over the sparse part of its scope (self-attn V) and the dense rows
    # (cross-attn K/V in full), as tune() trains that recipe; every other method reads the `ppt` scope.
    from ppt_fast.scope import ScopeEntry

    scope = host.scope("dreamstyler" if method == "dreamstyler" else "ppt")
    sparse = scope.resolve(lm)  # entries: name, param, rows (the in-scope rows of dim 0)
    t_params = [e.param for e in sparse]
    # uniform random pivots inside each tensor's scope rows, as flat indices into the whole tensor
    idx_parts, offsets = [], [0]
    for e in sparse:
        cols = e.param[0].numel()
        n_scope = (e.rows[1] - e.rows[0]) * cols
        keep = torch.nonzero(torch.rand(n_scope, generator=g) < density).reshape(-1) + e.rows[0] * cols
        idx_parts.append(keep.to(torch.int32).to(device))
        offsets.append(offsets[-1] + keep.numel())
    method_train = method
    ppt_sparse = None
    if method == "dreamstyler":  # the dense rows join the pivots (tune(): Scope.dense_pivots, unioned)
        from ppt_fast.pivots import PivotSet

        ppt_sparse = PivotSet([e.name for e in sparse], [e.param.shape for e in sparse], offsets,
                              torch.cat(idx_parts).cpu())  # fmt: skip
        dense = scope.dense_pivots(lm)
        params_all = dict(lm.named_parameters())
        joined = {e.name: part.long() for e, part in zip(sparse, idx_parts)}
        for n in dense.names:
            i = dense.indices_of(n).long().to(device)
            joined[n] = torch.unique(torch.cat([joined[n], i])) if n in joined else i
        order = [n for n, _ in lm.named_parameters() if n in joined]
        sparse = [ScopeEntry(n, params_all[n], (0, params_all[n].shape[0])) for n in order]
        t_params = [e.param for e in sparse]
        idx_parts, offsets = [joined[n].to(torch.int32) for n in order], [0]
        for part in idx_parts:
            offsets.append(offsets[-1] + part.numel())
        method_train = "ppt_fast"
    indices = torch.cat(idx_parts)
    k = offsets[-1]
    n_scope_total = sum((e.rows[1] - e.rows[0]) * e.param[0].numel() for e in sparse)
    n_trained_tensors = sum(p.numel() for p in t_params)

    def loss_fn():
        with autocast():
            return host.loss(codes, prompts)

    from ppt_fast.rowgrad import RowGrads

    def plain_step():  # the arms with a plain torch optimizer (tokens, full, the PEFT peers): opt set below
        with autocast():
            loss = host.loss(codes, prompts)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    handles = []
    impl = opt = None
    # ppt_fast's arm runs as tune() does: row-scoped weight gradients on unless the spec says "row_grads": false.
    row_grads = method_train == "ppt_fast" and bool(spec.get("row_grads", True))
    rg = RowGrads()
    if phase == "train" and method == "dense_masked":
        from ppt_fast.pivots import PivotSet

        names = [e.name for e in sparse]
        pivots = PivotSet(names, [p.shape for p in t_params], offsets, indices)
        for p in t_params:
            p.requires_grad_(True)
        opt, impl = cases._dense_masked_optimizer(names, t_params, pivots)

        def step():
            for p in t_params:
                p.grad = None
            loss_fn().backward()
            opt.step()

    elif phase == "train" and method == "tokens":  # the identifier embeddings only: no LM weight gradient at all
        dim = host.text_embedding("music").shape[-1]
        tok = torch.nn.Parameter(0.02 * torch.randn(3, dim, generator=g).to(device))
        host.identifier_bank().add("<v1>", tok)
        prompts = ["a piece of music, <v1>"]
        opt = torch.optim.AdamW([tok], lr=5e-3)
        impl = "three identifier tokens, torch.optim.AdamW"
        step = plain_step

    elif phase == "train" and method == "full":  # every LM weight, dense torch AdamW (tune()'s `full` recipe)
        full = [p for n, p in lm.named_parameters() if n in set(host.trainable_names())]
        for p in full:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(full, lr=cases.LR, weight_decay=0.0, foreach=False)
        impl = f"every LM weight ({sum(p.numel() for p in full):,} entries), torch.optim.AdamW(foreach=False) as tune()"
        step = plain_step

    elif phase == "train" and method in PEERS:
        opt, impl, peer = _peer_arm(host, method, sparse, indices, offsets, k)
        step = plain_step

    elif phase == "train":  # ppt_fast, and dreamstyler (the same optimizer over its pivots + dense rows)
        from ppt_fast.optim import SparseAdamW
        from ppt_fast.pivots import PivotSet

        names = [e.name for e in sparse]
        pivots = PivotSet(names, [p.shape for p in t_params], offsets, indices)
        for p in t_params:
            p.requires_grad_(True)
        opt = SparseAdamW(list(zip(names, t_params)), pivots, lr=cases.LR, weight_decay=cases.WD,
                          gather_in_backward=True)  # fmt: skip
        impl = "ppt_fast.optim.SparseAdamW(gather_in_backward=True), as ppt_fast.tune runs it"
        if row_grads:
            rg = tune_mod._row_grads(
                host, [(n, [tune_mod._pivot_rows(pivots.indices_of(n), p)], opt.row_sink(p))
                     for n, p in zip(names, t_params) if pivots.indices_of(n).numel()],
            ).install()  # fmt: skip
            impl += " with row-scoped gradients (ppt_fast.rowgrad)"

        def step():
            with rg.forward():
                loss = loss_fn()
            with rg.backward():
                loss.backward()
            opt.step()
            opt.zero_grad()

    elif method == "dense_masked":
        scores = [torch.zeros(e.rows[1] - e.rows[0], *e.param.shape[1:], device=device) for e in sparse]
        for p in t_params:
            p.requires_grad_(True)
        impl = "full gradients kept, then torch._foreach_addcmul_ over the scope rows"

        def step():
            for p in t_params:
                p.grad = None
            loss_fn().backward()
            grads = [e.param.grad[e.rows[0] : e.rows[1]] for e in sparse]
            torch._foreach_addcmul_(scores, grads, grads)

    else:
        from ppt_fast.sensitivity import SensitivityAccumulator

        acc = SensitivityAccumulator(lm, scope, mode="grad_sq")
        acc.__enter__()  # hooks on; left on until the process ends
        impl = "ppt_fast.SensitivityAccumulator (sensitivity_accumulate in post-accumulate-grad hooks, grads freed)"
        if row_grads:
            rg = tune_mod._row_grads(host, [(e.name, [e.rows], acc.row_sink(e.name)) for e in acc.entries]).install()
            impl += " with row-scoped gradients (ppt_fast.rowgrad)"

        def step():
            with rg.forward():
                loss = loss_fn()
            with rg.backward():
                loss.backward()

    routing = host.training(rg)  # audiocraft: checkpointing's recomputation sees the row-scoped linears
    routing.__enter__()
    gc.collect()
    base = provenance.memory_mark(device)
    # the first step is the warm-up (allocates optimizer state)
    times = provenance.timed_steps(step, 1 + int(spec.get("steps", 3)), device)
    peak, memory_kind = provenance.memory_peak(device)
    for h in handles:
        h.remove()
    from ppt_fast import _backend
    from ppt_fast.pivots import PivotSet

    concept = None  # what ours would store: (sparse pivots, {name: dense rows})
    if method in ("ppt_fast", "dense_masked"):
        concept = (PivotSet([e.name for e in sparse], [e.param.shape for e in sparse], offsets, indices.cpu()), {})
    elif method == "dreamstyler":
        sel = ppt_sparse  # the pivots drawn in the sparse scope, before the dense rows joined them
        concept = (sel, {e.name: e.rows for e in scope.resolve_dense(lm)})
    elif method == "tokens":
        concept = (PivotSet([], [], [0], torch.empty(0, dtype=torch.int32)), {})
    elif method == "full":
        concept = (PivotSet([], [], [0], torch.empty(0, dtype=torch.int32)), {n: None for n in host.trainable_names()})
    files = _file_sizes(host, phase, opt if phase == "train" else None, peer if method in PEERS else None, concept)
    return {
        **files,
        "step_seconds": statistics.median(times[1:]),
        "step_times": times,
        "peak_bytes": int(peak),
        "base_bytes": int(base),
        "peak_extra_bytes": int(peak - base),
        "memory_kind": memory_kind,
        "k": k,
        "entries_in_scope": n_scope_total,
        "entries_in_trained_tensors": n_trained_tensors,
        "trained_tensors": len(t_params),
        "row_grads": len(rg),
        "frames": frames,
        "impl": impl,
        "backends": {op: _backend.select(op, torch.device(device)) for op in cases.OPS},
        "lm_parameters": sum(p.numel() for p in lm.parameters()),
        "host": host.library,
        "dtype": str(next(lm.parameters()).dtype).replace("torch.", ""),
    }


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
