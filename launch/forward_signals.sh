#!/usr/bin/env bash
# Run a torchrun command so that SIGTERM, SIGINT (Ctrl-C) or SIGHUP sent to this script reaches
# the ranks instead of torchrun; the other launch scripts start torchrun through it:
#   bash launch/forward_signals.sh torchrun --standalone --nproc_per_node=2 -m nanotrain.train ...
# Why: torchrun (torch 2.13) turns a signal into an exception. It passes SIGTERM on to the ranks,
# which save a checkpoint and exit 0, but then exits 1 itself with a SignalException traceback.
# Signalled directly, the ranks save and exit 0 the same way, torchrun sees a job that succeeded
# and exits 0, and so does this script. The ranks are torchrun's children (each in a session of
# its own, so no terminal signal reaches them); `set -m` gives torchrun a process group of its
# own too, so a Ctrl-C reaches this script only. Each signal is passed on: the ranks take the
# first as a preemption and a second as "stop now".
# A rank that refuses bad input exits 2, but torchrun reports any failed child as 1: the ranks write
# their status to $NANOTRAIN_EXIT_STATUS_FILE, and this script exits 2 when they refused.
set -euo pipefail
if ! command -v pkill >/dev/null; then
  echo "error: launch/forward_signals.sh needs pkill to signal the ranks; install procps" >&2
  exit 2
fi
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
export NANOTRAIN_EXIT_STATUS_FILE=$status_file
set -m
"$@" &
launcher=$!
signalled=0
forward() { signalled=1; pkill -TERM -P "$launcher" || true; }
trap forward TERM INT HUP
status=
while [[ -z $status ]]; do
  signalled=0
  wait "$launcher" && code=0 || code=$?
  (( signalled && code > 128 )) || status=$code  # a trapped signal cut the wait short: wait again
done
if (( status != 0 )) && [[ $(cat "$status_file") == 2 ]]; then
  status=2
fi
exit "$status"
