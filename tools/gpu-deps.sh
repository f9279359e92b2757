#!/usr/bin/env bash
# tools/gpu-deps.sh: packs the Debian packages tuteld builds against (tools/bootstrap.sh's list,
# less the compilers and build tools) into .gpu-deps/tutel-deps.tar.gz, for a GPU machine that
# has CUDA and CMake but none of them and no network (DESIGN §6: everything the GPU check needs
# is built here or ships with the CUDA toolkit). tools/gpu-check.sh unpacks it into its build
# folder when a package is missing there, and builds and runs against it.
#
# The files are those the installed packages list (`dpkg -L`), without their documentation, so
# the archive holds exactly the versions this machine builds and tests with. The folder is
# ignored by git: name it in the device tool's `carry` (`.gpu-deps`).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1

# Headers, CMake configs, pkg-config files and the shared libraries they name, and the libraries
# those load (UCX needs libnuma; oneDNN, libOpenCL); pkg-config itself for an image without one.
packages=(
  libdnnl-dev libdnnl2
  ocl-icd-opencl-dev ocl-icd-libopencl1 opencl-c-headers opencl-clhpp-headers
  libtomlplusplus-dev libtomlplusplus3
  libuv1-dev libuv1
  libucx-dev libucx0 libnuma1
  nlohmann-json3-dev
  libcli11-dev
  libgtest-dev libgmock-dev
  pkgconf pkgconf-bin libpkgconf3
)

bash tools/bootstrap.sh >/dev/null
out_dir=.gpu-deps
archive="$out_dir/tutel-deps.tar.gz"
mkdir -p "$out_dir"
list=$(mktemp)
trap 'rm -f "$list"' EXIT
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    echo "gpu-deps: $p is not installed here; run tools/bootstrap.sh (or apt-get install $p)" >&2
    exit 1
  fi
  # Files and symbolic links only (tar adds their folders).
  dpkg -L "$p" | while IFS= read -r f; do
    case $f in
      /usr/share/doc/* | /usr/share/man/* | /usr/share/lintian/*) continue ;;
      # Static libraries are for other builds (GoogleTest's are all it has); UCX's InfiniBand
      # and RDMA-CM modules need libraries a single-GPU machine has no use for.
      */libgtest*.a | */libgmock*.a) ;;
      *.a | */ucx/libuct_ib* | */ucx/libuct_rdmacm*) continue ;;
    esac
    if [ -f "$f" ] || [ -L "$f" ]; then printf '%s\n' "${f#/}"; fi
  done
done | sort -u >"$list"
tar -czf "$archive.tmp" -C / -T "$list"
mv "$archive.tmp" "$archive"
{
  echo "# packed by tools/gpu-deps.sh on $(date -u +%Y-%m-%dT%H:%MZ)"
  for p in "${packages[@]}"; do dpkg-query -W -f='${Package} ${Version}\n' "$p"; done
} >"$out_dir/MANIFEST"
echo "gpu-deps: $(wc -l <"$list") files of ${#packages[@]} packages in $archive ($(du -h "$archive" | cut -f1))"
