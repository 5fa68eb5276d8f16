#!/usr/bin/env bash
# Nightly land-cover batch: the night's scenes, and the scenes earlier nights left unfinished.
# cron, the systemd timer and the SLURM job all call it the same way, without arguments (docs/batch.md).
#
#   geoseg-nightly.sh [NIGHT]        NIGHT: YYYY-MM-DD [default: yesterday, in $GEOSEG_TZ]
#
# Settings (environment; every one has a default):
#   GEOSEG_HOME       geoseg checkout with its .venv             [the checkout this script is in]
#   GEOSEG_PIPELINE   pipeline YAML                              [$GEOSEG_HOME/pipelines/landcover.yaml]
#   GEOSEG_INCOMING   a folder of scenes per night below it     [/data/incoming]
#   GEOSEG_SCENES     a night's scenes: glob, list or STAC file, {night} is replaced
#                                                                [$GEOSEG_INCOMING/{night}/*.tif]
#   GEOSEG_OUT        output root, a folder per night below it  [/data/landcover]
#   GEOSEG_LOGS       log root, a folder per night below it     [$GEOSEG_OUT/logs]
#   GEOSEG_CATCH_UP   earlier nights whose unfinished scenes are picked up [7] (with {night} in the pattern)
#   GEOSEG_PARTITION  SLURM partition of the worker jobs (a SLURM pipeline) [the cluster's default]
#   GEOSEG_TZ         time zone that decides "yesterday"        [the machine's]
#   GEOSEG_SET        more --set overrides, space-separated, e.g. "cluster.jobqueue.cores=16"
#
# Each night's batch skips finished scenes, resumes interrupted ones from their chunks, retries transient
# failures and does not retry scenes whose unchanged input failed. A night without scenes is a success.
# Exit: 0 every scene done or skipped, 3 some scenes failed, 130 stopped (SIGTERM/SIGINT; rerun to go on),
# 1 a night could not run at all, 4 geoseg met an internal error (a bug); the worst night's code wins.
set -uo pipefail
# First of all: SLURM's warning signal can come the moment the job starts (--signal=B:TERM@120 on a short
# job). Before a batch runs, a stop ends the script with 130; during one, it is passed on to geoseg.
child=
stopped=0
stop() { stopped=1; if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; fi; }
trap stop TERM INT

if [ -n "${GEOSEG_TZ:-}" ]; then export TZ=$GEOSEG_TZ; fi
night=${1:-$(date -d yesterday +%F)}
date -d "$night" +%F >/dev/null 2>&1 || { echo "geoseg-nightly: NIGHT must be YYYY-MM-DD (got '$night')" >&2; exit 1; }
home=${GEOSEG_HOME:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
pipeline=${GEOSEG_PIPELINE:-$home/pipelines/landcover.yaml}
incoming=${GEOSEG_INCOMING:-/data/incoming}
default_scenes="$incoming/{night}/*.tif"  # (a brace inside ${...:-} would end the expansion early)
scenes_of=${GEOSEG_SCENES:-$default_scenes}
out_root=${GEOSEG_OUT:-/data/landcover}
log_root=${GEOSEG_LOGS:-$out_root/logs}
catch_up=${GEOSEG_CATCH_UP:-7}
geoseg=$home/.venv/bin/geoseg
[ -x "$geoseg" ] || { echo "geoseg-nightly: $geoseg not found: run python3 dev.py test (or set GEOSEG_HOME)" >&2; exit 1; }

extra=()
if [ -n "${GEOSEG_PARTITION:-}" ]; then extra+=(--set "cluster.jobqueue.queue=$GEOSEG_PARTITION"); fi
for kv in ${GEOSEG_SET:-}; do extra+=(--set "$kv"); done

# run_night NIGHT: one night's batch into $out_root/NIGHT, its log in $log_root/NIGHT/batch.log.
run_night() {
    local n=$1 logs=$log_root/$1
    mkdir -p "$logs" "$out_root/$n" || return 1
    echo "$(date +%FT%T%z) geoseg-nightly: night $n, scenes ${scenes_of//\{night\}/$n}" >>"$logs/batch.log"
    "$geoseg" batch "$pipeline" --scenes "${scenes_of//\{night\}/$n}" --allow-empty \
        --set "output_dir=$out_root/$n" "${extra[@]}" >>"$logs/batch.log" 2>&1 &
    child=$!
    wait "$child"; local rc=$?
    # wait returns early when a trapped signal arrives: wait for geoseg itself to finish stopping.
    while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
    child=
    echo "$(date +%FT%T%z) geoseg-nightly: night $n exit $rc" >>"$logs/batch.log"
    return "$rc"
}

# Earlier nights have their own scenes only when the pattern names the night.
case $scenes_of in *"{night}"*) ;; *) catch_up=0 ;; esac
worst=0
for ((k = catch_up; k >= 0; k--)); do
    n=$(date -d "$night - $k day" +%F)
    if [ "$k" -gt 0 ]; then
        # An earlier night is queued when it has scenes and no batch finished them all (stopped by a time
        # limit, a scene failed for a transient reason, or the job never ran).
        manifest=$out_root/$n/batch.json
        if [ -f "$manifest" ] && grep -q '"ok": true' "$manifest"; then continue; fi
        compgen -G "${scenes_of//\{night\}/$n}" >/dev/null || continue
    fi
    if [ "$stopped" = 1 ]; then exit 130; fi
    run_night "$n"; rc=$?
    if [ "$stopped" = 1 ] || [ "$rc" = 130 ]; then exit 130; fi
    # Worst first: 4 (a bug), then 1 (a night could not run), then any other failure (3).
    if [ "$rc" = 4 ] || { [ "$rc" = 1 ] && [ "$worst" != 4 ]; } || { [ "$rc" != 0 ] && [ "$worst" = 0 ]; }; then
        worst=$rc
    fi
done
exit "$worst"
