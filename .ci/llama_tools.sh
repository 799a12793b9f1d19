#!/usr/bin/env bash
# llama.cpp's own command-line tools llama-quantize, llama-imatrix and llama-perplexity, built once from the
# llama.cpp vendored in the installed llama-cpp-python (same source as the library the GGUF exporter calls) and
# cached in ~/.cache/v4convert-ci/llama-tools/<version>/bin. Prints the bin directory on its last line.
# Used by tests/test_imatrix.py and bench/peers.py (llama-perplexity --kl-divergence) to cross-check our
# imatrix path and our verify against llama.cpp's own tools (optional in the tests:
# the export itself needs only llama-cpp-python). Portable x86-64 flags (the native build traps on AMX here).
set -euo pipefail
VER="$(python -c 'import llama_cpp; print(llama_cpp.__version__)')"
ROOT="${V4CONVERT_LLAMA_TOOLS:-$HOME/.cache/v4convert-ci/llama-tools}/$VER"
BIN="$ROOT/bin"
if [ -x "$BIN/llama-quantize" ] && [ -x "$BIN/llama-imatrix" ] && [ -x "$BIN/llama-perplexity" ]; then
    echo "$BIN"; exit 0
fi
mkdir -p "$ROOT"
SRC="$ROOT/src"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    rm -rf "$SRC" "$ROOT/dl"; mkdir -p "$ROOT/dl"
    python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VER" -d "$ROOT/dl" >&2
    mkdir -p "$SRC"
    tar xzf "$ROOT"/dl/llama_cpp_python-"$VER".tar.gz -C "$SRC" --strip-components=1
fi
cmake -S "$SRC/vendor/llama.cpp" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$ROOT/build" --target llama-quantize llama-imatrix llama-perplexity -j "${JOBS:-2}" >&2
mkdir -p "$BIN"
cp "$ROOT/build/bin/llama-quantize" "$ROOT/build/bin/llama-imatrix" "$ROOT/build/bin/llama-perplexity" "$BIN/"
echo "$BIN"
