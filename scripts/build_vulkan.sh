#!/usr/bin/env bash
# Build and install a Vulkan llamabind into its own venv, apart from the CPU one.
#
#   scripts/build_vulkan.sh [--clean]
#
# The venv (default build/venv-vulkan) gets llamabind from this checkout, built by pip
# with GGML_VULKAN=ON, the include dir from scripts/vulkan_headers.sh, and a build tree of
# its own (build/vulkan-<wheel tag>), so it never shares objects with the CPU build in
# build/<wheel tag>. The build tree persists: a second run rebuilds only what changed.
# --clean removes it first, for a from-scratch build (and its timing).
#
# With ccache as the compiler launcher (scripts/test.sh sets it up), the Vulkan build's
# CPU half (llama.cpp, ggml-base, ggml-cpu, the Cython module: the same sources and
# flags as the CPU build's) comes from the cache: its tree sits at the same depth as
# build/<wheel tag>, so the relative paths ccache hashes (CCACHE_BASEDIR) are the same.
# What is left to do is ggml-vulkan: compiling its shaders with glslc (not cached) and
# the C++ that embeds them.
#
# Run scripts/install_vulkan_deps.sh first (glslc, the loader, lavapipe).
#
# Environment:
#   LLAMABIND_VULKAN_VENV  the venv to create or reuse (default: <repo>/build/venv-vulkan)
#   PYTHON                 the interpreter to make it from (default: python3)
#   CMAKE_ARGS             passed on to CMake by scikit-build-core, as usual
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LLAMABIND_VULKAN_VENV:-$repo/build/venv-vulkan}
build_pattern=$repo/build/vulkan-'{wheel_tag}'
say() { echo "build_vulkan: $*" >&2; }

clean=0
for arg in "$@"; do
  case $arg in
    --clean) clean=1 ;;
    *) say "unknown argument: $arg (usage: $0 [--clean])"; exit 2 ;;
  esac
done

if [[ ! -x $venv/bin/python ]]; then
  say "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi

include=$("$repo/scripts/vulkan_headers.sh" | tail -n 1)
say "Vulkan headers: $include"

if ((clean)); then
  for tree in "$repo"/build/vulkan-*; do
    [[ -f $tree/CMakeCache.txt ]] || continue
    say "removing $tree"
    rm -rf "$tree"
  done
fi

say "building llamabind with GGML_VULKAN=ON (the shaders take a while on few cores)"
start=$SECONDS
# From a neutral directory, so nothing imports the checkout instead of what pip builds.
(cd / && "$venv/bin/python" -m pip install -v "$repo" \
  -C cmake.define.GGML_VULKAN=ON \
  -C cmake.define.Vulkan_INCLUDE_DIR="$include" \
  -C build-dir="$build_pattern")
elapsed=$((SECONDS - start))

# The import must see the Vulkan backend compiled in; whether a device is usable is the
# test's business (lavapipe needs GGML_VK_VISIBLE_DEVICES, see tests/test_vulkan.py).
(cd / && "$venv/bin/python" - <<'EOF'
import llamabind

backends = llamabind.backends()
print(f"build_vulkan: backends compiled in: {backends}")
if "Vulkan" not in backends:
    raise SystemExit("build_vulkan: the installed llamabind has no Vulkan backend")
EOF
)
say "llamabind with Vulkan installed into $venv in ${elapsed}s"
