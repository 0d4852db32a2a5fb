#!/usr/bin/env bash
# One chaos run end to end: build the binaries and images, bring docker-compose.yml up
# from scratch (fresh volumes), run twopc-chaos against it, collect the containers'
# logs, take it all down.
#
#   docker/chaos.sh                  # short run: 10 faults of every kind (a few minutes)
#   docker/chaos.sh --long           # 60 faults of every kind
#   docker/chaos.sh --last-agent     # the short run with the coordinator's --last-agent
#   docker/chaos.sh --broken         # a coordinator that skips logging its decisions,
#                                    # killed 3 times: passes only if a rule it targets
#                                    # fails
#   docker/chaos.sh -- --seed 42     # anything after -- goes to twopc-chaos
#
# Results: chaos-results/{chaos,broken}-report.json and compose logs. Needs root (the
# latency faults run tc inside the containers' network namespaces) and a docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

per_kind=10
broken=0
last_agent=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --long) per_kind=60 ;;
    --short) per_kind=10 ;;
    --broken) broken=1 ;;
    --last-agent) last_agent=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

project=twopc
compose() { docker-compose -p "$project" "$@"; }
mkdir -p chaos-results

echo "== build release binaries"
cargo build --release -p twopc-coordinator -p twopc-participant -p twopc-testkit --bins
echo "== build images"
docker/build-images.sh
set -a; . ./.env; set +a

if [ "$broken" = 1 ]; then
  export TWOPC_COORDINATOR_BIN=twopc-coordinator-fp
  export TWOPC_FAILPOINTS="coordinator.skip_decision_log=skip"
  name=broken
  # What a coordinator that forgets its commit decisions breaks once it restarts: the
  # committed transfers recovery then rolls back on some databases, and what GET says.
  args=(--kinds kill_coordinator --faults-per-kind 3
        --expect-violation total_conserved,atomic_transfers,acknowledged_commits_present,unknown_outcomes_resolved,coordinator_agrees,consistent_reads)
elif [ "$last_agent" = 1 ]; then
  export TWOPC_LAST_AGENT=true
  name=chaos-last-agent
  args=(--faults-per-kind "$per_kind" --expect-last-agent)
else
  name=chaos
  args=(--faults-per-kind "$per_kind")
fi

cleanup() {
  compose logs --no-color > "chaos-results/$name-compose.log" 2>&1 || true
  compose down -v --remove-orphans > /dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== docker-compose up ($name)"
compose down -v --remove-orphans > /dev/null 2>&1 || true
compose up -d --no-build

echo "== twopc-chaos"
target/release/twopc-chaos --project "$project" --report "chaos-results/$name-report.json" \
  "${args[@]}" "${extra[@]}"
