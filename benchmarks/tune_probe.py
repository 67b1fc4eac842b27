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
    scope = host.scope("ppt")
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
    indices = torch.cat(idx_parts)
    k = offsets[-1]
    n_scope_total = sum((e.rows[1] - e.rows[0]) * e.param[0].numel() for e in sparse)
    n_trained_tensors = sum(p.numel() for p in t_params)

    def loss_fn():
        with autocast():
            return host.loss(codes, prompts)

    from ppt_fast.rowgrad import RowGrads

    handles = []
    impl = None
    # ppt_fast's arm runs as tune() does: row-scoped weight gradients on unless the spec says "row_grads": false.
    row_grads = method == "ppt_fast" and bool(spec.get("row_grads", True))
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

    elif phase == "train":
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

    return {
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
