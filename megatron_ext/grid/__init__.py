"""The paper's comparison as a feature: a grid of runs (sizes × architectures × seeds), run
locally or as a Slurm array, collected into the paper's table."""
