#!/usr/bin/env bash
# Run on each worker by launch.sh (not by hand): COMMAND... as a child of this shell, and its exit
# status into STATUS_FILE when it ends, which stop.sh, supervise.sh and a user can read (a pid alone
# cannot tell a finished job from a failed one). SIGTERM to this shell goes on to the command, so
# stop.sh's SIGTERM to the pid in JOB.pid (this shell's) still lets pretrain save its step.
#
# Usage: tpu_scripts/job.sh STATUS_FILE COMMAND...

set -u
status_file=$1
shift
rm -f "$status_file"
echo "job.sh: $(date -u +%FT%TZ) started on $(hostname): $*"  # also restarts the log's silence clock
"$@" &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
# a trap ends `wait` early: wait again until the child is gone, then once more for its status
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
echo $? > "$status_file.tmp" && mv "$status_file.tmp" "$status_file"
