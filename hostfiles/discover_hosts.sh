#!/usr/bin/env bash
# Host discovery for elastic runs: horovodrun calls it every few seconds and starts workers on
# the hosts it prints, one "host:slots" a line; a host that leaves the list loses its workers,
# one that appears gets workers at the next commit. This one prints the lines of
# $ELASTIC_HOSTS (default: hostfiles/elastic-hosts beside it), comments dropped, or
# "localhost:<cores>" when there is no such file. On a cluster, print what the scheduler holds.
#   horovodrun -np 3 --min-np 2 --max-np 3 --host-discovery-script hostfiles/discover_hosts.sh \
#       python recipes/translate.py --elastic
# A worker that fails takes its host out of the job for a cool-down: with every worker on one
# host, the job ends; list one line per machine.
set -euo pipefail
hosts_file=${ELASTIC_HOSTS:-$(dirname "${BASH_SOURCE[0]}")/elastic-hosts}
if [ -f "$hosts_file" ]; then
  grep -v '^\s*\(#\|$\)' "$hosts_file"
else
  echo "localhost:$(nproc)"
fi
