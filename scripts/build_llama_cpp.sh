#!/usr/bin/env bash
# Build llama.cpp from the llama-cpp-python source package (the reference
# implementation for parity fixtures and for bench/). Prints shell assignments:
#   eval "$(scripts/build_llama_cpp.sh)"
# Cached under ${HANLIN_LLAMA_CPP_DIR:-$HOME/.cache/hanlin/llama.cpp}.
# HANLIN_LLAMA_AVX2_ONLY=1 builds the AVX2 path only (no AVX-512), to compare
# with HANLIN_SIMD=avx2 on an AVX-512 machine; HANLIN_LLAMA_AVXVNNI=1 the
# AVX2 path with AVX-VNNI (an Alder Lake's), to compare with
# HANLIN_SIMD=avxvnni. HANLIN_LLAMA_NO_AMX=1 builds natively without AMX.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="${HANLIN_LLAMA_CPP_DIR:-$HOME/.cache/hanlin/llama.cpp}"
SRC="$DIR/llama_cpp_python-$VERSION"
BUILD=build
CMAKE_SIMD=(-DGGML_NATIVE=ON)
if [ "${HANLIN_LLAMA_AVX2_ONLY:-0}" = 1 ]; then
  BUILD=build-avx2
  CMAKE_SIMD=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF)
elif [ "${HANLIN_LLAMA_AVXVNNI:-0}" = 1 ]; then
  BUILD=build-avxvnni
  CMAKE_SIMD=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=OFF)
elif [ "${HANLIN_LLAMA_NO_AMX:-0}" = 1 ]; then
  # Native, but without Intel AMX: on a Xeon (family 6 model 207) its AMX
  # matmul died at its first tileloadd (SIGILL), with 1 or 2 threads.
  BUILD=build-noamx
  NOAMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  CMAKE_SIMD=(-DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NOAMX" "-DCMAKE_CXX_FLAGS=$NOAMX")
fi
BIN="$SRC/vendor/llama.cpp/$BUILD/bin"
if [ ! -x "$BIN/llama-bench" ]; then
  mkdir -p "$DIR"
  if [ ! -d "$SRC" ]; then
    # Only llama-cpp-python itself as source: its build requirements
    # (cmake, scikit-build-core) come as wheels, or pip would compile cmake.
    [ -f "$DIR/llama_cpp_python-$VERSION.tar.gz" ] ||
      python3 -m pip download --no-deps --no-binary llama-cpp-python -d "$DIR" "llama-cpp-python==$VERSION" >&2
    tar -xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
  command -v cmake >/dev/null || { echo "cmake is required (apt-get install cmake)" >&2; exit 1; }
  (cd "$SRC/vendor/llama.cpp" &&
    cmake -B "$BUILD" "${CMAKE_SIMD[@]}" -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2 &&
    cmake --build "$BUILD" -j"$(nproc)" --target llama-bench llama-cli llama-server llama >&2)
fi
echo "export LLAMA_CPP_PY='$SRC'"
echo "export LLAMA_CPP_LIB_PATH='$BIN'"
echo "export LLAMA_CPP_BIN='$BIN'"
echo "export LD_LIBRARY_PATH='$BIN'${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
