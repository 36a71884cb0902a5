#!/bin/sh
# An example task command for `ifc agent`: it gets the task only through the environment
# (never as an argument or through a shell template), does its "work", and exits 0 to complete it.
set -eu
echo "session $IFC_SESSION_ID working on $IFC_TASK_ID (fencing token $IFC_FENCING_TOKEN, backend $IFC_BACKEND)"
sleep "${IFC_DEMO_WORK_SECONDS:-1}"
echo "done with $IFC_TASK_ID"
# The demo collects what was done (one line per completed run) to check for double work.
if [ -n "${IFC_DEMO_DONE_FILE:-}" ]; then echo "$IFC_TASK_ID $IFC_SESSION_ID" >>"$IFC_DEMO_DONE_FILE"; fi
