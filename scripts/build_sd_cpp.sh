#!/usr/bin/env bash
# Build stable-diffusion.cpp's command-line program from the
# stable-diffusion-cpp-python source package (the peer bench/image_speed.py
# measures Hanlin against). Prints a shell assignment:
#   eval "$(scripts/build_sd_cpp.sh)"
# Cached under ${HANLIN_SD_CPP_DIR:-$HOME/.cache/hanlin/sd.cpp}.
set -euo pipefail
VERSION="${SD_CPP_PYTHON_VERSION:-0.4.7}"
DIR="${HANLIN_SD_CPP_DIR:-$HOME/.cache/hanlin/sd.cpp}"
SRC="$DIR/stable_diffusion_cpp_python-$VERSION"
TREE="$SRC/vendor/stable-diffusion.cpp"
BIN="$TREE/build/bin"
if [ ! -x "$BIN/sd-cli" ] && [ ! -x "$BIN/sd" ]; then
  mkdir -p "$DIR"
  if [ ! -d "$SRC" ]; then
    # Only the package itself as source: its build requirements come as
    # wheels, or pip would compile cmake.
    [ -f "$DIR/stable_diffusion_cpp_python-$VERSION.tar.gz" ] ||
      python3 -m pip download --no-deps --no-binary stable-diffusion-cpp-python -d "$DIR" \
        "stable-diffusion-cpp-python==$VERSION" >&2
    tar -xzf "$DIR/stable_diffusion_cpp_python-$VERSION.tar.gz" -C "$DIR"
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet cmake >&2
  (cd "$TREE" &&
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DSD_WEBP=OFF -DSD_WEBM=OFF >&2 &&
    cmake --build build -j"$(nproc)" >&2)
fi
if [ -x "$BIN/sd-cli" ]; then echo "export SD_CPP_BIN='$BIN/sd-cli'"; else echo "export SD_CPP_BIN='$BIN/sd'"; fi
