#!/usr/bin/env bash
# audiocraft 1.3.0 beside torch 2.13.0 (CPU), the recipe measured in DESIGN.md §5:
# audiocraft's own metadata pins torch==2.1.0 and av==11 (no cp311 wheel), so it goes in with --no-deps and its
# runtime needs are listed here; none of them pulls another torch.
# The runtime needs go in first and audiocraft last: pip checks the installed packages' requirements after an install
# that resolves dependencies, and with audiocraft already in it would print "ERROR: pip's dependency resolver ...
# audiocraft 1.3.0 requires torch==2.1.0, but you have torch 2.13.0" (expected with --no-deps, but it reads as a
# failure). A --no-deps install runs no check; install anything else before this script, or after it with --no-deps.
# xformers is needed although this torch is a CPU build: audiocraft.modules.transformer imports it unconditionally
# (only its pure-Python parts run on CPU; `import ppt_fast` silences its "can't load C++/CUDA extensions" warning).
set -euo pipefail
PIP=${PIP:-pip}
SITE=$($PIP --version | sed -E 's/^pip [^ ]+ from (.*)\/pip .*/\1/')
$PIP install -q numpy einops omegaconf julius num2words soundfile av sentencepiece transformers huggingface_hub \
    flashy torchmetrics xformers spacy librosa
$PIP install -q --no-deps audiocraft==1.3.0 torchaudio==2.11.0
# The PyPI torchaudio wheel is a CUDA build; without its .so files it imports as pure Python and the transforms
# audiocraft uses still work on CPU.
if [ -d "$SITE/torchaudio/lib" ] && ! python -c 'import torch,sys; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null; then
    rm -f "$SITE"/torchaudio/lib/*.so
fi
