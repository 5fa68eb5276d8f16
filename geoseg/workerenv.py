"""What every Dask worker geoseg starts runs with: its environment and the resource inference tasks ask for.

A leaf module: the local cluster, the job-queue clusters and ``geoseg worker`` all read it.
"""

#: glibc returns the forward pass's large buffers to the OS after every batch (and Dask's nanny sets
#: MALLOC_TRIM_THRESHOLD_=65536 by default), which made CPU inference 30-45% slower here. Raising both
#: thresholds keeps the buffers in the process. Dask runs tasks in threads, and glibc's per-thread arenas
#: cannot hold blocks over 64 MiB (a batch of 512 px activations is larger), so they are mmapped and
#: unmapped on every batch whatever the thresholds: forward passes in a worker thread ran 1.5x slower
#: than in the main thread until MALLOC_ARENA_MAX=1 put every thread on the main heap. Set for every
#: worker the nanny spawns.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296", "MALLOC_ARENA_MAX": "1"}
#: GDAL's block cache defaults to 5% of RAM per process and fills up as a large scene streams through a
#: worker; a task reads each window once, so a small cache loses nothing and keeps memory flat.
GDAL_CACHE_MB = 128
#: Dask pauses a worker whose memory passes 80% of its limit until it falls again. With the thresholds above
#: a worker's memory does not fall after a forward pass, so a paused worker never resumed and the run waited
#: for ever (seen with a 2 GiB SLURM job: 0.86 of 1 GiB after loading torch). geoseg's tasks hold one chunk
#: each and hand their results to Zarr, so pausing protects nothing here; the nanny's restart at 95% stays.
PAUSE_ENV = {"DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE": "False"}
WORKER_ENV = {**MALLOC_ENV, "GDAL_CACHEMAX": str(GDAL_CACHE_MB), **PAUSE_ENV}
#: Worker resource an inference task asks for: the number a worker offers is how many it runs at once.
INFER = "infer"
