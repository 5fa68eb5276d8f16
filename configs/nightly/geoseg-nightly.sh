#!/usr/bin/env bash
# Nightly land-cover batch: segment the day's new scenes, one log folder per night.
# Called by cron, a systemd timer or SLURM (see the other files in this folder and docs/batch.md).
# Rerunning the same night is safe: finished scenes are skipped, interrupted ones resume from their chunks.
#
#   GEOSEG_HOME      geoseg checkout with its .venv          (default: this repository)
#   GEOSEG_PIPELINE  pipeline YAML                           (default: pipelines/landcover.yaml)
#   GEOSEG_SCENES    glob, list file or STAC ItemCollection  (default: /data/incoming/<night>/*.tif)
#   GEOSEG_OUT       output root; a folder per night below   (default: /data/landcover)
#   GEOSEG_LOGS      log root; a folder per night below      (default: $GEOSEG_OUT/logs)
set -euo pipefail
night=${1:-$(date +%F)}
home=${GEOSEG_HOME:-$(cd "$(dirname "$0")/../.." && pwd)}
pipeline=${GEOSEG_PIPELINE:-$home/pipelines/landcover.yaml}
scenes=${GEOSEG_SCENES:-/data/incoming/$night/*.tif}
out=${GEOSEG_OUT:-/data/landcover}/$night
logs=${GEOSEG_LOGS:-${GEOSEG_OUT:-/data/landcover}/logs}/$night
mkdir -p "$logs"
# The exit code is the batch's: 0 only when every scene is done or skipped (cron mails, systemd marks failed).
exec "$home/.venv/bin/geoseg" batch "$pipeline" --scenes "$scenes" --set "output_dir=$out" \
    >>"$logs/batch.log" 2>&1
