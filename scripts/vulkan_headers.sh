#!/usr/bin/env bash
# Print an include directory with Vulkan headers new enough for ggml-vulkan, fetching
# them first when the system's are too old.
#
#   inc=$(scripts/vulkan_headers.sh)
#   pip install . -C cmake.define.GGML_VULKAN=ON -C cmake.define.Vulkan_INCLUDE_DIR="$inc"
#
# ggml-vulkan at llamabind's pinned llama.cpp needs Vulkan-Headers 1.3.275 or newer
# (vk::LayerSettingEXT); Debian bookworm ships 1.3.239. The headers are header-only, so
# the newer ones from the next Debian release (trixie's libvulkan-dev) serve as they are
# with bookworm's loader and glslc. They are fetched without changing the system's apt
# set-up: a private sources directory, made from the machine's own Debian archive entry
# with the suite swapped, a private lists and cache directory, and `apt-get download`
# plus `dpkg -x` into a private prefix. apt checks the package against the archive's
# signed index, as for any install. Nothing is installed system-wide.
#
# Only the last line of stdout is the include directory; progress goes to stderr.
# Idempotent: a prefix that already holds new enough headers is reused as it is.
#
# Environment:
#   LLAMABIND_VULKAN_HEADERS_PREFIX  where to unpack (default: <repo>/build/vulkan-headers)
#   LLAMABIND_VULKAN_HEADERS_SUITE   the Debian suite to take them from (default: trixie)
#   LLAMABIND_VULKAN_HEADERS_FORCE=1 fetch even when the system's headers would do
set -euo pipefail

min_version=275   # VK_HEADER_VERSION of the oldest 1.3.x headers ggml-vulkan compiles with
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=${LLAMABIND_VULKAN_HEADERS_PREFIX:-$repo/build/vulkan-headers}
suite=${LLAMABIND_VULKAN_HEADERS_SUITE:-trixie}
say() { echo "vulkan_headers: $*" >&2; }

# VK_HEADER_VERSION of the headers under $1, or 0 when there are none.
header_version() {
  local core=$1/vulkan/vulkan_core.h
  [[ -f $core && -f $1/vulkan/vulkan.hpp ]] || { echo 0; return; }
  awk '$1 == "#define" && $2 == "VK_HEADER_VERSION" { print $3; found = 1; exit }
       END { if (!found) print 0 }' "$core"
}

include=$prefix/usr/include
if (($(header_version "$include") >= min_version)); then
  say "reusing $(cat "$prefix/.llamabind-source" 2>/dev/null || echo "headers") in $prefix"
  echo "$include"
  exit 0
fi
if [[ ${LLAMABIND_VULKAN_HEADERS_FORCE:-0} != 1 ]] &&
   (($(header_version /usr/include) >= min_version)); then
  say "the system's Vulkan headers (1.x.$(header_version /usr/include)) are new enough"
  echo /usr/include
  exit 0
fi

# --- the machine's own Debian archive entry, as a deb822 stanza for $suite -----------
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n $codename ]] || { say "cannot tell this system's release (/etc/os-release)"; exit 1; }

# Prints "URI<TAB>SIGNED_BY" for the first entry of type deb that carries $codename
# itself (not -updates or -security), from deb822 .sources files and one-line lists.
find_archive() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f $f ]] || continue
    awk -v want="$codename" '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " want " ") && uris != "" &&
            enabled != "no") {
          split(uris, u, " "); print u[1] "\t" signed; found = 1; exit
        }
        types = uris = suites = signed = ""; enabled = "yes"
      }
      BEGIN { enabled = "yes" }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      {
        key = tolower($1); sub(/:$/, "", key)
        val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        if (key == "types") types = val
        else if (key == "uris") uris = val
        else if (key == "suites") suites = val
        else if (key == "signed-by") signed = val
        else if (key == "enabled") enabled = tolower(val)
      }
      END { if (!found) flush() }' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [[ -f $f ]] || continue
    awk -v want="$codename" '
      $1 != "deb" { next }
      {
        i = 2; signed = ""
        if ($2 ~ /^\[/) {
          opts = ""
          for (; i <= NF; i++) { opts = opts " " $i; if ($i ~ /\]$/) { i++; break } }
          if (match(opts, /signed-by=[^] ]+/))
            signed = substr(opts, RSTART + 10, RLENGTH - 10)
        }
        if ($(i + 1) == want) { print $i "\t" signed; exit }
      }' "$f"
  done
}

entry=$(find_archive | head -n 1)
if [[ -z $entry ]]; then
  say "no apt entry for '$codename' found under /etc/apt; this script fetches the headers"
  say "from the Debian archive the machine already uses. Elsewhere, install Vulkan-Headers"
  say "1.3.$min_version or newer and pass their include dir as -DVulkan_INCLUDE_DIR."
  exit 1
fi
uri=${entry%%$'\t'*}
signed_by=${entry#*$'\t'}
signed_by=${signed_by:-/usr/share/keyrings/debian-archive-keyring.gpg}

work=$prefix.apt
mkdir -p "$work/sources.list.d" "$work/lists/partial" "$work/cache/archives/partial" \
         "$work/debs"
cat >"$work/sources.list.d/llamabind-vulkan-headers.sources" <<EOF
# Written by llamabind's scripts/vulkan_headers.sh; used only through its own apt options.
Types: deb
URIs: $uri
Suites: $suite
Components: main
Signed-By: $signed_by
EOF

apt_opts=(
  -o Dir::Etc::SourceList=/dev/null
  -o Dir::Etc::SourceParts="$work/sources.list.d"
  -o Dir::State::Lists="$work/lists"
  -o Dir::Cache="$work/cache"
  -o Acquire::Languages=none
  -o APT::Architectures="$(dpkg --print-architecture)"
)
# apt drops privileges to _apt for downloads; it must be able to write the private dirs.
if [[ $(id -u) -eq 0 ]] && id _apt >/dev/null 2>&1; then
  chown -R _apt "$work/lists/partial" "$work/debs" 2>/dev/null || true
fi

say "reading the $suite index of $uri (private apt lists in $work)"
apt-get "${apt_opts[@]}" -qq update >&2
version=$(apt-cache "${apt_opts[@]}" show "libvulkan-dev/$suite" 2>/dev/null |
          awk '/^Version:/ { print $2; exit }')
[[ -n $version ]] || { say "libvulkan-dev is not in $suite"; exit 1; }

rm -f "$work/debs"/libvulkan-dev_*.deb
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "libvulkan-dev/$suite" >&2)
deb=$(ls "$work/debs"/libvulkan-dev_*.deb)

# Unpack into a fresh directory and move it in place, so an interrupted run never
# leaves a half-filled prefix that the reuse check above would accept.
rm -rf "$prefix.new"
mkdir -p "$prefix.new"
dpkg -x "$deb" "$prefix.new"
echo "libvulkan-dev $version ($suite)" >"$prefix.new/.llamabind-source"
got=$(header_version "$prefix.new/usr/include")
if ((got < min_version)); then
  say "libvulkan-dev $version from $suite has VK_HEADER_VERSION $got, need $min_version+"
  exit 1
fi
rm -rf "$prefix"
mv "$prefix.new" "$prefix"
say "libvulkan-dev $version ($suite, VK_HEADER_VERSION $got) unpacked into $prefix"
echo "$include"
