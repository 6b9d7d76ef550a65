#!/usr/bin/env bash
# Installs the Debian packages that building images, running a real node and the browser tests
# need, where missing: podman and buildah (`make images`), mmdebstrap (the images' base where no
# registry can be reached), the CNI plugins and iptables (pods' network on a real node),
# libseccomp-dev (runc's seccomp support, built by hack/tools.sh), chromium (the status page's
# browser tests drive it headless through Playwright, which never downloads a browser of its
# own). On another distribution it names what to install.
set -euo pipefail
PACKAGES=(podman buildah runc mmdebstrap containernetworking-plugins iptables libseccomp-dev chromium)

missing=()
for package in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "host-packages: install ${missing[*]} (Debian's names), then run this again" >&2
  exit 1
fi
SUDO=()
[[ $(id -u) -eq 0 ]] || SUDO=(sudo)
echo "host-packages: installing ${missing[*]}"
"${SUDO[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
