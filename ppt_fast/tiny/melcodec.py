"""A small learned audio codec for the embedded default model: residual VQ over log-mel frames, Griffin-Lim decoder.

Why not a small EnCodec: a SEANet encoder/decoder with adversarial and multi-scale spectral losses needs GPU-days to
reach recognisable timbre; on the 2-core CPU budget of the default model (the whole pretraining in <= 60 min) it
would still be noise. Instrument timbre lives in the short-time spectral envelope, which a log-mel frame keeps; a
residual vector quantiser fitted by k-means over the corpus' frames codes it, and a phase-reconstructing decoder
(interpolate the mel bands back onto the STFT bins, then fast Griffin-Lim) turns codes into audio. Phase is not
coded, so the sound is "spectrogram-like" (soft transients, some phasiness), but the instrument stays recognisable
(figures in the README).

`MelRVQCodec` implements audiocraft's `CompressionModel` interface (`encode -> (codes [B, K, F], None)`,
`decode(codes) -> [B, 1, T]`, `frame_rate`, `cardinality`, `num_codebooks`, ...), so MusicGen's generation and
training code run unchanged. Everything is deterministic: encoding is a nearest-neighbour search, decoding starts
Griffin-Lim from a fixed phase.

Signal path (16 kHz mono by default): STFT (Hann 1024, hop 320 -> 50 Hz frames) -> magnitude -> band averages
over `n_mels` triangular mel bands that form a partition of unity on the STFT bins -> log -> per-band
standardisation -> K residual codebooks (k-means, optionally refined jointly: `refine_codebooks`), encoded greedily
or by beam search over the levels (`MelCodecConfig.encode_beam`). Decode: sum of code vectors -> de-standardise ->
exp -> linear interpolation back onto the STFT bins (the same triangles) -> fast Griffin-Lim (momentum 0.99).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)

try:  # audiocraft is optional for `import ppt_fast`; the codec is only built where audiocraft is installed
    from audiocraft.models.encodec import CompressionModel as _Base
except ImportError:  # pragma: no cover - exercised only without audiocraft
    _Base = torch.nn.Module  # type: ignore[assignment,misc]


@dataclass(frozen=True)
class MelCodecConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 320
    n_mels: int = 256  # 128 bands blur the harmonics enough that the timbre embedder confuses instruments
    n_q: int = 4
    bins: int = 1024
    griffin_lim_iters: int = 48
    momentum: float = 0.99
    log_floor: float = 1e-2  # added before the log: quiet bins (the noise floor) compress to one value
    per_band_std: bool = False  # False: one global scale, so quiet noisy bands do not get the codebooks' attention
    # Encoding: 1 = greedy residual search (level by level, nearest code); > 1 = beam search keeping that many partial
    # sums, which finds codes closer to the frame than greedy (see `_quantize`).
    encode_beam: int = 1

    @property
    def frame_rate(self) -> int:
        return self.sample_rate // self.hop


def _hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def _mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_triangles(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """`[n_mels, n_fft // 2 + 1]` triangles centred on mel-spaced frequencies from 0 to Nyquist, peak 1.

    The first centre is 0 Hz and the last is Nyquist, so at every STFT bin two neighbouring triangles are non-zero
    and sum to 1 (a partition of unity): `bands.T @ values` interpolates band values linearly back onto the bins.
    Where centres are closer than the bins (below ~100 Hz for 256 bands at 16 kHz) a few bands catch no bin: their
    feature is a constant and decoding never reads them.
    """
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    centres = _mel_to_hz(torch.linspace(0.0, float(_hz_to_mel(torch.tensor(sample_rate / 2.0))), n_mels,
                                        dtype=torch.float64))  # fmt: skip
    out = torch.zeros(n_mels, freqs.numel(), dtype=torch.float64)
    for m in range(n_mels):
        c = centres[m]
        if m > 0:
            lo = centres[m - 1]
            sel = (freqs >= lo) & (freqs <= c)
            out[m, sel] = (freqs[sel] - lo) / (c - lo)
        if m < n_mels - 1:
            hi = centres[m + 1]
            sel = (freqs >= c) & (freqs <= hi)
            out[m, sel] = (hi - freqs[sel]) / (hi - c)
        out[m, freqs == c] = 1.0
    return out.float()


class MelRVQCodec(_Base):
    """Residual VQ over standardised log-mel frames; Griffin-Lim decoder (see the module docstring)."""

    #: Decoding caps standardised log-magnitudes here. A sum of K code vectors can leave the range of any audio the
    #: codec was fitted on when an LM picks an unusual combination: a demo clip with a tuned concept reached 6.8
    #: (band magnitudes ~e^5 above the loudest corpus frame) and decoded to a burst peaking at 86 x full scale. On
    #: the default model the corpus' frames reach 3.87 and their codes decode to at most 4.96 (1536 clips, 614 k
    #: frames; the eval's round-trip clips 4.67), so what the codec encodes decodes exactly as before.
    Z_CEILING = 5.0

    def __init__(self, config: MelCodecConfig | None = None) -> None:
        super().__init__()
        cfg = config or MelCodecConfig()
        self.config = cfg
        tri = mel_triangles(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
        self.register_buffer("bands", tri)  # [M, Fq]: partition of unity on the bins
        self.register_buffer("band_norm", tri.sum(1).clamp_min(1e-8))  # [M]: band averages divide by this
        self.register_buffer("window", torch.hann_window(cfg.n_fft))
        self.register_buffer("mean", torch.zeros(cfg.n_mels))
        self.register_buffer("std", torch.ones(cfg.n_mels))
        self.register_buffer("codebooks", torch.zeros(cfg.n_q, cfg.bins, cfg.n_mels))
        self._n_q = cfg.n_q

    # ---- audiocraft CompressionModel interface -------------------------------------------------------------------
    @property
    def channels(self) -> int:
        return 1

    @property
    def frame_rate(self) -> float:
        return float(self.config.frame_rate)

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def cardinality(self) -> int:
        return self.config.bins

    @property
    def num_codebooks(self) -> int:
        return self._n_q

    @property
    def total_codebooks(self) -> int:
        return self.config.n_q

    def set_num_codebooks(self, n: int) -> None:
        if not 1 <= n <= self.config.n_q:
            raise ValueError(f"num_codebooks must be in [1, {self.config.n_q}], got {n}")
        self._n_q = n

    def forward(self, x: torch.Tensor):
        from audiocraft.quantization import QuantizedResult

        self._check_mono(x)
        feats = self.features(x)
        codes = self._quantize(feats)
        penalty = ((self.decode_latent(codes) - feats) ** 2).mean()
        y = self.decode(codes)
        y = torch.nn.functional.pad(y, (0, max(0, x.shape[-1] - y.shape[-1])))[..., : x.shape[-1]]
        bandwidth = torch.tensor(self._n_q * math.log2(self.config.bins) * self.frame_rate / 1000)  # kbps
        return QuantizedResult(y, codes, bandwidth, penalty=penalty)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """`[B, 1, T]` float audio at `sample_rate` -> codes int64 `[B, K, T // hop]`."""
        self._check_mono(x)
        return self._quantize(self.features(x)), None

    @staticmethod
    def _check_mono(x: torch.Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"MelRVQCodec.encode expects [B, 1, T] mono audio, got {tuple(x.shape)}")

    def _quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised frames `[B, F, M]` -> codes `[B, K, F]`: greedy residual nearest neighbours, or a beam search
        over the levels when `config.encode_beam > 1`."""
        b, f, m = z.shape
        codes = rvq_encode(z.reshape(b * f, m), self.codebooks[: self._n_q], self.config.encode_beam).T
        return codes.reshape(self._n_q, b, f).permute(1, 0, 2).contiguous()

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """codes `[B, K, F]` -> standardised log-mel frames `[B, F, M]` (sum of the K code vectors)."""
        return rvq_decode(codes.transpose(1, 2), self.codebooks)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """codes `[B, K, F]` -> audio `[B, 1, F * hop]` (Griffin-Lim from a fixed phase: deterministic)."""
        if scale is not None:
            raise ValueError("MelRVQCodec does not use a scale")
        z = self.decode_latent(codes.long())
        return self.synthesise(z)

    # ---- signal path ---------------------------------------------------------------------------------------------
    def _stft(self, y: torch.Tensor) -> torch.Tensor:
        return torch.stft(y, self.config.n_fft, self.config.hop, window=self.window, center=True, return_complex=True)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 1, T]` -> log band magnitudes `[B, F, M]` with F = T // hop (unstandardised)."""
        hop = self.config.hop
        y = x[:, 0].float()
        frames = y.shape[-1] // hop
        if frames < 1:
            raise ValueError(f"audio of {y.shape[-1]} samples is shorter than one codec frame ({hop} samples)")
        mag = self._stft(y[..., : frames * hop]).abs()[..., :frames]  # [B, Fq, F]
        bands = torch.einsum("mq,bqf->bfm", self.bands, mag) / self.band_norm
        return torch.log(bands + self.config.log_floor)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(x) - self.mean) / self.std

    def synthesise(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised log-mel frames `[B, F, M]` (capped at `Z_CEILING`) -> audio `[B, 1, F * hop]`."""
        cfg = self.config
        z = z.clamp(max=self.Z_CEILING)
        bands = (torch.exp(z * self.std + self.mean) - cfg.log_floor).clamp_min(0)  # [B, F, M]
        mag = torch.einsum("bfm,mq->bqf", bands, self.bands)  # [B, Fq, F]: linear interpolation onto the bins
        b, _, f = mag.shape
        length = f * cfg.hop
        # STFT(center=True) of `length` samples has f + 1 frames; repeat the last one so shapes match.
        mag = torch.cat([mag, mag[..., -1:]], dim=-1)
        angles = torch.ones_like(mag, dtype=torch.complex64)  # fixed initial phase (0): deterministic
        prev = torch.zeros_like(angles)
        for _ in range(cfg.griffin_lim_iters):
            y = torch.istft(mag * angles, cfg.n_fft, cfg.hop, window=self.window, center=True, length=length)
            rebuilt = self._stft(y)
            new = rebuilt - (cfg.momentum / (1 + cfg.momentum)) * prev
            angles = new / new.abs().clamp_min(1e-8)
            prev = rebuilt
        y = torch.istft(mag * angles, cfg.n_fft, cfg.hop, window=self.window, center=True, length=length)
        return y.unsqueeze(1)

    # ---- fitting ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def fit(self, frames: torch.Tensor, *, iters: int = 12, sample: int = 120_000, seed: int = 0,
            refine_passes: int = 0) -> dict:  # fmt: skip
        """Fit the standardisation and the K codebooks on unstandardised log-mel frames `[N, M]` (residual k-means),
        then `refine_passes` rounds of joint refinement (`refine_codebooks`).

        Returns per-level relative residual energies (how much of the signal's variance each level leaves) and, when
        refined, the relative coding error of the sample after each pass.
        """
        g = torch.Generator().manual_seed(seed)
        frames = frames.float()
        self.mean.copy_(frames.mean(0))
        std = frames.std(0) if self.config.per_band_std else frames.std(0).pow(2).mean().sqrt().expand(frames.shape[1])
        self.std.copy_(std.clamp_min(1e-3))
        z = (frames - self.mean) / self.std
        if z.shape[0] > sample:
            z = z[torch.randperm(z.shape[0], generator=g)[:sample]]
        total = float((z**2).sum())
        residual = z.clone()
        energies = []
        for k in range(self.config.n_q):
            self.codebooks[k].copy_(kmeans(residual, self.config.bins, iters=iters, generator=g))
            residual -= self.codebooks[k][nearest(residual, self.codebooks[k])]
            energies.append(float((residual**2).sum()) / total)
            logger.info("codebook %d: residual energy %.3f", k, energies[-1])
        out: dict = {"residual_energy": energies}
        if refine_passes:
            out["refined_error"] = refine_codebooks(z, self.codebooks, refine_passes, beam=self.config.encode_beam)
        return out

    def config_dict(self) -> dict:
        return asdict(self.config)

    # ---- compact storage ----------------------------------------------------------------------------------------
    def packed_state(self) -> dict[str, torch.Tensor]:
        """What a weights file needs to rebuild this codec: the fitted standardisation and the codebooks stored as
        int8 with one fp32 scale per code vector (absmax / 127). The other buffers are functions of the config.

        8 x 1024 x 256 codebooks are 8.4 MB in fp32, 2.1 MB packed. The rounding error is at most scale / 2 per
        entry; measured on the default model's codec: mean squared error 8e-6 per (standardised) entry, 0.03 % of
        what the 8 levels leave unexplained; re-encoding corpus frames with the packed codebooks keeps 96 % of the
        codes and raises the coding error by 0.3 %. The figures are measured on the packed codec.
        """
        cb = self.codebooks.float()
        scale = cb.abs().amax(-1).clamp_min(1e-12) / 127.0  # [K, bins]
        q = torch.round(cb / scale[..., None]).clamp_(-127, 127).to(torch.int8)
        return {"mean": self.mean.clone(), "std": self.std.clone(), "codebooks_int8": q, "codebooks_scale": scale}

    def load_packed_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`packed_state`; raises ValueError naming the entry whose shape does not fit the config."""
        cfg = self.config
        want = {"mean": (cfg.n_mels,), "std": (cfg.n_mels,), "codebooks_int8": (cfg.n_q, cfg.bins, cfg.n_mels),
                "codebooks_scale": (cfg.n_q, cfg.bins)}  # fmt: skip
        for k, shape in want.items():
            if k not in state:
                raise ValueError(f"packed codec state lacks {k!r}")
            if tuple(state[k].shape) != shape:
                got = tuple(state[k].shape)
                raise ValueError(f"packed codec state {k!r} has shape {got}, the config needs {shape}")
        self.mean.copy_(state["mean"])
        self.std.copy_(state["std"])
        self.codebooks.copy_(state["codebooks_int8"].float() * state["codebooks_scale"].float()[..., None])


def nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for each row of `x` `[N, D]`; ties -> lowest index."""
    c2 = (codebook**2).sum(1)
    out = []
    for i in range(0, x.shape[0], chunk):
        xs = x[i : i + chunk]
        d = c2[None] - 2 * xs @ codebook.T
        out.append(d.argmin(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, beam: int = 1) -> torch.Tensor:
    """Residual VQ codes `[N, K]` of `x` `[N, D]`: `greedy_encode` for `beam <= 1`, else `beam_encode`."""
    return beam_encode(x, codebooks, beam) if beam > 1 else greedy_encode(x, codebooks)


def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes `[..., K]` -> the sum of their code vectors `[..., D]` (levels in order, starting from 0)."""
    return sum(codebooks[k][codes[..., k]] for k in range(codes.shape[-1]))


def _lloyd_step(x: torch.Tensor, idx: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres moved to the mean of the rows of `x` assigned to them (`idx`); a centre no row picks keeps its place.
    Returns the new centres and the mask of those empty ones."""
    sums = torch.zeros_like(centres).index_add_(0, idx, x)
    counts = torch.bincount(idx, minlength=centres.shape[0]).to(x.dtype)
    empty = counts == 0
    return torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None]), empty


def greedy_encode(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Residual VQ codes `[N, K]` of `x` `[N, D]` over `codebooks` `[K, C, D]`, level by level (nearest code)."""
    residual = x
    codes = []
    for cb in codebooks:
        idx = nearest(residual, cb)
        codes.append(idx)
        residual = residual - cb[idx]
    return torch.stack(codes, 1) if codes else torch.zeros(x.shape[0], 0, dtype=torch.long)


def beam_encode(x: torch.Tensor, codebooks: torch.Tensor, beam: int, chunk: int = 2048) -> torch.Tensor:
    """Residual VQ codes `[N, K]` by beam search: at each level every kept partial sum is extended by every code and
    the `beam` extensions with the smallest squared error are kept; the best full path is returned.

    Greedy encoding (`beam=1`) commits to the nearest code at each level, although a slightly worse first choice can
    leave a residual the later levels code better. On the default model's codec (8 levels of 1024) a beam of 8 cuts
    the coding error of held-out corpus frames by ~10 % for 8x the distance computations (experiments/default_model).
    Ties go to the lowest (beam, code) index, so the result is deterministic.
    """
    k_levels, n_codes, d = codebooks.shape
    out = []
    for i in range(0, x.shape[0], chunk):
        xs = x[i : i + chunk]
        n = xs.shape[0]
        res = xs[:, None, :]  # [n, b, D]: residual of each kept path
        err = (xs**2).sum(1, keepdim=True)  # [n, b]: squared error of each kept path
        paths = torch.zeros(n, 1, 0, dtype=torch.long)
        for cb in codebooks:
            b = res.shape[1]
            # |r - c|^2 = |r|^2 + |c|^2 - 2 r.c for every (path, code)
            dist = err[:, :, None] + (cb**2).sum(1)[None, None] - 2 * torch.einsum("nbd,cd->nbc", res, cb)
            top = dist.reshape(n, b * n_codes).topk(min(beam, b * n_codes), dim=1, largest=False, sorted=True)
            src, code = top.indices // n_codes, top.indices % n_codes
            res = torch.gather(res, 1, src[..., None].expand(-1, -1, d)) - cb[code]
            err = top.values
            kept = torch.gather(paths, 1, src[..., None].expand(-1, -1, paths.shape[2]))
            paths = torch.cat([kept, code[..., None]], 2)
        out.append(paths[:, 0])
    return torch.cat(out) if out else torch.zeros(0, k_levels, dtype=torch.long)


def refine_codebooks(z: torch.Tensor, codebooks: torch.Tensor, passes: int, *, beam: int = 1) -> list[float]:
    """Joint refinement of residual codebooks `[K, C, D]` (in place) on frames `z` `[N, D]`.

    Residual k-means fits each level to what the levels before it left, and never revisits them. Each pass here
    encodes `z` with the current codebooks as the codec will (greedy, or beam search when `beam > 1`), then for every
    level in turn re-fits its code vectors to the frames minus all *other* levels' contributions (one Lloyd step:
    reassign, recentre; a code no frame picks keeps its vector). Returns the relative coding error
    `|z - decode(encode(z))|^2 / |z|^2` with the codec's own encoder before the first pass and after each pass.
    """
    total = max(float((z**2).sum()), 1e-12)
    codes = rvq_encode(z, codebooks, beam)
    errors = [float(((z - rvq_decode(codes, codebooks)) ** 2).sum()) / total]
    for _ in range(passes):
        approx = rvq_decode(codes, codebooks)
        for k, cb in enumerate(codebooks):
            others = approx - cb[codes[:, k]]
            target = z - others  # what level k should code, given the others
            idx = nearest(target, cb)
            cb.copy_(_lloyd_step(target, idx, cb)[0])
            codes[:, k] = idx
            approx = others + cb[idx]
        codes = rvq_encode(z, codebooks, beam)
        errors.append(float(((z - rvq_decode(codes, codebooks)) ** 2).sum()) / total)
        logger.info("codebook refinement pass %d: coding error %.4f", len(errors) - 1, errors[-1])
    return errors


def kmeans(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++-style seeding on a subsample; empty clusters re-seeded at the worst-fit points."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least {k} frames, got {n}")
    # k-means++ seeding on a subsample (cheap and much better than uniform picks for skewed audio frames).
    sub = x[torch.randperm(n, generator=generator)[: min(n, 20 * k)]]
    centres = [sub[int(torch.randint(0, sub.shape[0], (1,), generator=generator))]]
    d2 = ((sub - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / d2.numel())
        j = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(sub[j])
        d2 = torch.minimum(d2, ((sub - sub[j]) ** 2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        idx = nearest(x, c)
        c, empty = _lloyd_step(x, idx, c)
        if bool(empty.any()):
            err = ((x - c[idx]) ** 2).sum(1)
            worst = err.topk(int(empty.sum())).indices
            c[empty] = x[worst]
    return c.contiguous()
