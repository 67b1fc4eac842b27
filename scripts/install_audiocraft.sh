#!/usr/bin/env bash
# audiocraft 1.3.0 beside torch 2.13.0 (CPU), the recipe measured in DESIGN.md §5:
# audiocraft's own metadata pins torch==2.1.0 and av==11 (no cp311 wheel), so it goes in with --no-deps and its
# runtime needs are listed here; none of them pulls another torch.
set -euo pipefail
PIP=${PIP:-pip}
SITE=$($PIP --version | sed -E 's/^pip [^ ]+ from (.*)\/pip .*/\1/')
$PIP install -q --no-deps audiocraft==1.3.0 torchaudio==2.11.0
$PIP install -q numpy einops omegaconf julius num2words soundfile av sentencepiece transformers huggingface_hub \
    flashy torchmetrics xformers spacy librosa
# The PyPI torchaudio wheel is a CUDA build; without its .so files it imports as pure Python and the transforms
# audiocraft uses still work on CPU.
if [ -d "$SITE/torchaudio/lib" ] && ! python -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    rm -f "$SITE"/torchaudio/lib/*.so
fi
