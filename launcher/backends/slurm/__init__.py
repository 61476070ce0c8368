"""The Slurm backend, one module per place its code runs.

- `backend.py`: submit host (CLI): plan / submit / refresh / cancel; imports submitit lazily.
- `sbatch.py`: submit host, pure: the sbatch script and the srun step, for --dry-run too.
- `status.py`: submit host: the one sacct + squeue query and the state table.
- `array.py`: submit host: sweep points as chunked job arrays.
- `batch.py`: the batch shell on the first node (under submitit): starts the step, requeues.
- `rank.py`: every rank, under srun (maybe in a container): standard library only.

This file imports nothing: `rank.py` must load without submitit or torch.
"""
