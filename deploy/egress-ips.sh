#!/usr/bin/env bash
# Egress IPs for originpool: add them to an interface, remove them, check them, and print
# the snippet that makes them survive a reboot. See egress-ips.md for the why.
#
#   egress-ips.sh add DEV ADDR...      add now (idempotent); ADDR is IP or IP/PREFIX
#   egress-ips.sh del DEV ADDR...      remove now (absent ones are fine)
#   egress-ips.sh check ADDR...        exit 0 only if every IP is usable as a source here
#   egress-ips.sh persist KIND DEV ADDR...
#                                      print a networkd, netplan or ifupdown snippet
#
# A bare IP gets /32 (IPv4) or /128 (IPv6): the address becomes local without adding a
# route, so the host's default source address and routing stay exactly as they were.
# IPv6 addresses are added with nodad: a "tentative" address (during duplicate address
# detection) cannot be bound, and the pool would mark it down for a while.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 64
}

with_prefix() {  # IP or IP/PREFIX -> IP/PREFIX
  case "$1" in
    */*) printf '%s\n' "$1" ;;
    *:*) printf '%s/128\n' "$1" ;;
    *) printf '%s/32\n' "$1" ;;
  esac
}

ip_only() { printf '%s\n' "${1%%/*}"; }

add() {
  local dev=$1 addr
  shift
  for addr in "$@"; do
    addr=$(with_prefix "$addr")
    if [[ $addr == *:* ]]; then
      ip -6 addr replace "$addr" dev "$dev" nodad
    else
      ip addr replace "$addr" dev "$dev"
    fi
    echo "added $addr on $dev"
  done
}

del() {
  local dev=$1 addr
  shift
  for addr in "$@"; do
    addr=$(with_prefix "$addr")
    if ip addr del "$addr" dev "$dev" 2>/dev/null; then
      echo "removed $addr from $dev"
    else
      echo "not on $dev: $addr"
    fi
  done
}

check() {
  local addr ip bad=0
  for addr in "$@"; do
    ip=$(ip_only "$addr")
    # `ip addr show to IP` lists the interface holding exactly this local address
    if [[ -z $(ip -o addr show to "$ip") ]]; then
      echo "MISSING   $ip: not an address of this host (or this network namespace)"
      bad=1
    elif ip -o addr show to "$ip" | grep -q tentative; then
      echo "TENTATIVE $ip: duplicate address detection still running; bind would fail"
      bad=1
    else
      echo "ok        $ip on $(ip -o addr show to "$ip" | awk '{print $2}')"
    fi
  done
  if command -v originpool >/dev/null 2>&1; then
    # the census of this namespace: how full each (source IP, destination) pair is
    originpool ports || true
  fi
  return $bad
}

persist() {
  local kind=$1 dev=$2 addr
  shift 2
  case "$kind" in
    networkd)
      echo "# /etc/systemd/network/10-$dev.network.d/originpool-egress.conf"
      echo "# (a drop-in for the .network file that already matches $dev), then:"
      echo "#   networkctl reload && networkctl reconfigure $dev"
      for addr in "$@"; do
        addr=$(with_prefix "$addr")
        echo "[Address]"
        echo "Address=$addr"
        if [[ $addr == *:* ]]; then echo "DuplicateAddressDetection=none"; fi
      done
      ;;
    netplan)
      echo "# /etc/netplan/60-originpool-egress.yaml, then: netplan apply"
      echo "# (merged with the file that configures $dev: its other settings stay there)"
      echo "network:"
      echo "  version: 2"
      echo "  ethernets:"
      echo "    $dev:"
      echo "      addresses:"
      for addr in "$@"; do echo "        - \"$(with_prefix "$addr")\""; done
      ;;
    ifupdown)
      echo "# append to the 'iface $dev' stanzas in /etc/network/interfaces, then: ifup $dev"
      for addr in "$@"; do
        addr=$(with_prefix "$addr")
        if [[ $addr == *:* ]]; then
          echo "iface $dev inet6 static"
          echo "    address $addr"
          echo "    dad-attempts 0"
        else
          echo "iface $dev inet static"
          echo "    address $addr"
        fi
      done
      ;;
    *) usage ;;
  esac
}

[[ $# -ge 1 ]] || usage
command=$1
shift
case "$command" in
  add) [[ $# -ge 2 ]] || usage; add "$@" ;;
  del) [[ $# -ge 2 ]] || usage; del "$@" ;;
  check) [[ $# -ge 1 ]] || usage; check "$@" ;;
  persist) [[ $# -ge 3 ]] || usage; persist "$@" ;;
  *) usage ;;
esac
