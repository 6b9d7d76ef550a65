#!/usr/bin/env bash
# Installs the Debian packages that building images and running a real node need, where they are
# missing: podman and buildah (`make images`), mmdebstrap (the images' base where no registry can
# be reached), the CNI plugins and iptables (pods' network on a real node), libseccomp-dev (runc's
# seccomp support, built by hack/tools.sh). On another distribution it names what to install.
set -euo pipefail
PACKAGES=(podman buildah runc mmdebstrap containernetworking-plugins iptables libseccomp-dev)

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
