#!/usr/bin/env bash
# Installs the Debian packages tuteld builds against. Idempotent: installs only
# what is missing and runs `apt-get update` at most once per call.
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  libdnnl-dev ocl-icd-opencl-dev      # oneDNN (CPU matmul); its CMake config needs OpenCL
  libtomlplusplus-dev                 # config parsing
  libuv1-dev                          # daemon event loop
  libucx-dev                          # host transport between daemons
  nlohmann-json3-dev                  # safetensors headers
  libcli11-dev                        # command lines
  libgtest-dev libgmock-dev           # tests
  python3-numpy                       # the Python module (client/python) and its tests
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "bootstrap: all ${#packages[@]} packages present"
  exit 0
fi

echo "bootstrap: installing ${missing[*]}"
sudo_cmd=()
[ "$(id -u)" -ne 0 ] && sudo_cmd=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -qq
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
