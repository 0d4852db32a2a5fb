#!/usr/bin/env bash
# One chaos run end to end: build the binaries and images, bring docker-compose.yml up
# from scratch (fresh volumes), run twopc-chaos against it, collect the containers'
# logs, take it all down.
#
#   docker/chaos.sh                  # short run: 10 faults of every kind (a few minutes)
#   docker/chaos.sh --long           # 60 faults of every kind
#   docker/chaos.sh --last-agent     # the short run with the coordinator's --last-agent
#   docker/chaos.sh --broken NAME    # a deliberately broken build (below), a short run:
#                                    # passes only if a rule it targets fails
#   docker/chaos.sh --broken all     # every broken build, one run each
#   docker/chaos.sh -- --seed 42     # anything after -- goes to twopc-chaos
#
# Broken builds (failpoints set to `skip` in the -fp binaries), each with the rules it
# must break:
#   skip-log           the coordinator commits without logging its decision
#   answer-early       the coordinator answers `committed` before its decision is durable
#   recovery-rollback  recovery rolls back the branches of committed transactions
#   agent-commits-no   an agent votes NO on every 40th prepared branch and commits it
#
# Results: chaos-results/<name>-report.json and compose logs. Needs root (the
# latency faults run tc inside the containers' network namespaces) and a docker engine.
set -euo pipefail
cd "$(dirname "$0")/.."

per_kind=10
broken=""
last_agent=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --long) per_kind=60 ;;
    --short) per_kind=10 ;;
    --broken)
      shift
      [ $# -gt 0 ] || { echo "--broken wants a name (see the top of $0)" >&2; exit 2; }
      broken="$1" ;;
    --last-agent) last_agent=1 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown option $1 (see the top of $0)" >&2; exit 2 ;;
  esac
  shift
done

project=twopc
compose() { docker-compose -p "$project" "$@"; }
mkdir -p chaos-results

if [ "$broken" = all ]; then
  status=0
  for b in skip-log answer-early recovery-rollback agent-commits-no; do
    "$0" --broken "$b" -- "${extra[@]}" || status=1
  done
  exit "$status"
fi

echo "== build release binaries"
cargo build --release -p twopc-coordinator -p twopc-participant -p twopc-testkit --bins
echo "== build images"
docker/build-images.sh
set -a; . ./.env; set +a

if [ -n "$broken" ]; then
  name="broken-$broken"
  case "$broken" in
    skip-log)
      # A coordinator that forgets its commit decisions: once it restarts, recovery rolls
      # back committed transfers on some databases, and GET says aborted.
      export TWOPC_COORDINATOR_BIN=twopc-coordinator-fp
      export TWOPC_FAILPOINTS="coordinator.skip_decision_log=skip"
      args=(--kinds kill_coordinator --faults-per-kind 3
            --expect-violation total_conserved,atomic_transfers,acknowledged_commits_present,unknown_outcomes_resolved,coordinator_agrees,consistent_reads) ;;
    answer-early)
      # Told committed, then killed before the decision was forced: recovery presumes
      # abort for what the client was told committed.
      export TWOPC_COORDINATOR_BIN=twopc-coordinator-fp
      export TWOPC_FAILPOINTS="coordinator.answer_before_durable=skip"
      args=(--kinds kill_coordinator --faults-per-kind 3
            --expect-violation acknowledged_commits_present,coordinator_agrees) ;;
    recovery-rollback)
      # Killed between the decision and phase 2 (widened by a pause after each decision),
      # then the restarted coordinator's recovery rolls the committed branches back.
      export TWOPC_COORDINATOR_BIN=twopc-coordinator-fp
      export TWOPC_FAILPOINTS="coordinator.recovery_rolls_back_committed=skip;coordinator.after_decision=sleep(100)"
      args=(--kinds kill_coordinator --faults-per-kind 3
            --expect-violation acknowledged_commits_present,atomic_transfers,total_conserved,unknown_outcomes_resolved) ;;
    agent-commits-no)
      # The coordinator aborts what the agent voted NO on; the agent committed it.
      export TWOPC_PARTICIPANT_BIN=twopc-participant-fp
      export TWOPC_AGENT_FAILPOINTS="participant.commit_voted_no=skip%40"
      args=(--kinds pause --faults-per-kind 2
            --expect-violation acknowledged_aborts_absent,atomic_transfers,total_conserved) ;;
    *) echo "unknown broken build $broken (see the top of $0)" >&2; exit 2 ;;
  esac
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
