#!/usr/bin/env bash
# Build ik_llama.cpp (the fastest CPU peer we know) from the PyPI source
# package `ik-llama-cpp-python`, which vendors its tree under
# vendor/ik_llama.cpp, for bench/. Prints shell assignments:
#   eval "$(scripts/build_ik_llama_cpp.sh)"     # sets IK_LLAMA_CPP_BIN
# Cached under ${HANLIN_IK_LLAMA_CPP_DIR:-$HOME/.cache/hanlin/ik_llama.cpp}.
# HANLIN_IK_AVX2_ONLY=1 builds the AVX2 path only (no AVX-512), to compare
# with HANLIN_SIMD=avx2 on an AVX-512 machine.
set -euo pipefail
VERSION="${IK_LLAMA_CPP_PYTHON_VERSION:-0.1.5}"
DIR="${HANLIN_IK_LLAMA_CPP_DIR:-$HOME/.cache/hanlin/ik_llama.cpp}"
SRC="$DIR/ik_llama_cpp_python-$VERSION/vendor/ik_llama.cpp"
FLAVOUR=native
CMAKE_SIMD=(-DGGML_NATIVE=ON)
if [ "${HANLIN_IK_AVX2_ONLY:-0}" = 1 ]; then
  FLAVOUR=avx2
  CMAKE_SIMD=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF)
fi
BUILD="$SRC/build-$FLAVOUR"
BIN="$BUILD/bin"
if [ ! -x "$BIN/llama-bench" ]; then
  mkdir -p "$DIR"
  if [ ! -d "$SRC" ]; then
    [ -f "$DIR/ik_llama_cpp_python-$VERSION.tar.gz" ] ||
      python3 -m pip download --no-deps --no-binary ik-llama-cpp-python -d "$DIR" "ik-llama-cpp-python==$VERSION" >&2
    tar -xzf "$DIR/ik_llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
  fi
  # The package lacks common/cmake/build-info-gen-cpp.cmake (llama.cpp's
  # build fills common/build-info.cpp.in with it); a stand-in does the same.
  GEN="$SRC/common/cmake/build-info-gen-cpp.cmake"
  if [ ! -f "$GEN" ]; then
    mkdir -p "$(dirname "$GEN")"
    cat > "$GEN" <<'CMAKE'
set(BUILD_NUMBER 0)
set(BUILD_COMMIT "ik-llama-cpp-python")
set(BUILD_COMPILER "${CMAKE_C_COMPILER_ID} ${CMAKE_C_COMPILER_VERSION}")
set(BUILD_TARGET "native")
configure_file("${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp.in" "${CMAKE_CURRENT_LIST_DIR}/../build-info.cpp")
CMAKE
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
  (cd "$SRC" &&
    cmake -B "build-$FLAVOUR" "${CMAKE_SIMD[@]}" -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release \
      -DLLAMA_BUILD_TESTS=OFF >&2 &&
    cmake --build "build-$FLAVOUR" -j"$(nproc)" --target llama-bench llama-server >&2)
fi
echo "export IK_LLAMA_CPP_BIN='$BIN'"
