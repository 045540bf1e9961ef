#!/usr/bin/env bash
# Install, from the machine's own Debian/Ubuntu archive, what a Vulkan build of llamabind
# needs: the Vulkan loader and its (possibly too old) headers, the glslc shader compiler,
# glslang and SPIR-V headers, and Mesa's Vulkan drivers, which include lavapipe, a
# Vulkan device that runs on the CPU so the build can be tested on a machine with no GPU.
#
# Idempotent: packages already installed are left alone, and apt is not touched at all
# when nothing is missing. On Debian bookworm the headers installed here (1.3.239) are
# too old for ggml-vulkan; scripts/vulkan_headers.sh fetches new enough ones.
set -euo pipefail

packages=(
  libvulkan-dev        # the loader to link (libvulkan.so) and headers
  libvulkan1           # the loader at run time
  glslc                # compiles ggml-vulkan's compute shaders at build time
  glslang-tools        # glslangValidator: CMake's FindVulkan looks for it too
  spirv-headers        # SPIR-V headers, for shader tooling built against them
  mesa-vulkan-drivers  # lavapipe (llvmpipe's Vulkan device): Vulkan on the CPU
  vulkan-tools         # vulkaninfo --summary: which devices the loader finds
)

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  if [[ "$status" != "installed" ]]; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install_vulkan_deps: all present: ${packages[*]}"
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install_vulkan_deps: need root or sudo" >&2; exit 1; }
  sudo=(sudo)
fi

echo "install_vulkan_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# A fresh container often has no package lists yet; a failed install is retried once
# after refreshing them, since stale lists are the usual cause.
if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
