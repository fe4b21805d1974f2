#!/usr/bin/env bash
# Prints the Ray custom resources of this host as JSON, for `ray start --resources="$(...)"`.
#
#   node-resources.sh memory=IP[,IP...] compute=IP[,IP...] [shards-per-memory-host]
#
# Ray's `local` provider has a single node type and does not pass per-type resources to `ray start`,
# so cluster/local.yaml names its memory hosts and its GPU (compute) hosts here and every worker
# runs this to learn which one it is. A memory host advertises {"engram_memory": N} (N shards fit on
# it, default 2); a compute host advertises {"engram_compute": G}, G being its GPU count (one training
# worker a GPU). A host in neither list, or in both, is refused: it would otherwise join silently with
# no role, and shards or trainers would wait for a node that never comes.
set -euo pipefail

memory_hosts="" compute_hosts="" shards=2
for arg in "$@"; do
  case "$arg" in
    memory=*) memory_hosts="${arg#memory=}" ;;
    compute=*) compute_hosts="${arg#compute=}" ;;
    [1-9] | [1-9][0-9]) shards="$arg" ;;
    *) echo "node-resources.sh: unknown argument '$arg'" >&2; exit 2 ;;
  esac
done

# Every name and address this host answers to.
mine=" $(hostname -I 2>/dev/null || true) $(hostname 2>/dev/null || true) $(hostname -f 2>/dev/null || true) "

listed() {  # listed "a,b,c": whether one of them is this host
  local host
  for host in ${1//,/ }; do
    [[ "$mine" == *" $host "* ]] && return 0
  done
  return 1
}

is_memory=false is_compute=false
listed "$memory_hosts" && is_memory=true
listed "$compute_hosts" && is_compute=true

if $is_memory && $is_compute; then
  echo "node-resources.sh: this host ($mine) is listed as both a memory and a compute host" >&2; exit 1
elif $is_memory; then
  printf '{"engram_memory": %d}\n' "$shards"
elif $is_compute; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if [[ "${gpus:-0}" -lt 1 ]]; then
    echo "node-resources.sh: compute host ($mine) but nvidia-smi lists no GPU" >&2; exit 1
  fi
  printf '{"engram_compute": %d}\n' "$gpus"
else
  echo "node-resources.sh: this host ($mine) is in neither memory= nor compute= of cluster/local.yaml" >&2; exit 1
fi
